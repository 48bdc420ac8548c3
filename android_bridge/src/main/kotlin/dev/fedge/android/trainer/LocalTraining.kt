package dev.fedge.android.trainer

import dev.fedge.android.client.Plan
import dev.fedge.android.client.PlanException
import dev.fedge.android.protocol.ConditionsLapsed
import java.util.Random

/**
 * A device's own batch norm entries of one task under FedBN, kept in [file] as a raw float32
 * frame; null before the first round or after the model changed.
 */
class LocalLayers(val file: java.io.File) {
    fun load(size: Int): FloatArray? = try {
        if (file.isFile) dev.fedge.android.codec.Updates.decode(file.readBytes(), expectedLength = size) else null
    } catch (e: IllegalArgumentException) {
        null // damaged or another model's: start from the global layers
    }

    // Durable, or a power cut could undo the save after the round's upload was acknowledged: the
    // device would train on with the layers of an earlier round.
    fun save(values: FloatArray) =
        dev.fedge.android.client.Durable.writeFile(file, dev.fedge.android.frame.Frame.encodeFloats(values))
}

/** What a training run reports: mean batch loss (example-weighted), examples and steps. */
class TrainResult(val loss: Double, val numExamples: Int, val examplesSeen: Int, val steps: Int)

class EvalResult(val loss: Double, val numExamples: Int, val accuracy: Double?)

/**
 * One assignment's local work (edge_sdk/local_training.py): the plan's epochs or step count,
 * its batch size, `lr * lr_decay^round`, FedProx, and a conditions re-check every
 * `recheck_every_steps` steps and a stop check before every step, either of which ends
 * training with [ConditionsLapsed]. Under a `"batchnorm": "local"` plan (FedBN) the device's
 * own batch norm entries ([LocalLayers]) replace the global ones for training and evaluation,
 * the trained ones are saved, and the trainer ends holding the start's values for them (the
 * update reports no change there).
 */
object LocalTraining {
    /** Rows per eval-graph call. */
    const val EVAL_BATCH = 256

    @JvmStatic
    fun train(
        trainer: OrtStepTrainer,
        data: Dataset,
        plan: Plan,
        start: FloatArray,
        round: Int,
        rng: Random,
        recheck: () -> List<String> = { emptyList() },
        stopped: () -> Boolean = { false },
        local: LocalLayers? = null,
    ): TrainResult {
        val index = if (plan.batchnorm == "local") trainer.manifest.batchnormIndices() else IntArray(0)
        val begin = withLocal(start, index, local)
        trainer.setParameters(begin)
        trainer.resetOptimizer()
        trainer.setProximal(if (plan.proxMu > 0) begin else null, plan.proxMu)
        val lr = plan.lrForRound(round).toFloat()
        var total = 0.0
        var seen = 0
        var steps = 0
        val every = plan.recheckEverySteps
        for (batch in planBatches(data, plan, rng)) {
            // A stop request (the system ended the job) is checked before every step.
            if (stopped()) throw ConditionsLapsed(listOf("stopped by the system"), steps)
            if (every > 0 && steps > 0 && steps % every == 0) {
                val reasons = recheck()
                if (reasons.isNotEmpty()) throw ConditionsLapsed(reasons, steps)
            }
            val loss = trainer.trainStep(batch, lr)
            if (!loss.isFinite()) throw ArithmeticException("training loss became $loss at step $steps")
            total += loss.toDouble() * batch.size
            seen += batch.size
            steps++
        }
        if (steps == 0) throw PlanException("the plan ran no step: the dataset yielded no batch")
        if (index.isNotEmpty()) {
            val trained = trainer.getParameters()
            local?.save(FloatArray(index.size) { trained[index[it]] })
            for (i in index) trained[i] = start[i]
            trainer.setParameters(trained)
        }
        return TrainResult(total / seen, data.numExamples ?: seen, seen, steps)
    }

    private fun planBatches(data: Dataset, plan: Plan, rng: Random): Sequence<Batch> = sequence {
        if (plan.epochs != null) {
            repeat(plan.epochs) { yieldAll(data.batches(plan.batchSize, rng)) }
            return@sequence
        }
        var left = plan.steps!!
        while (left > 0) {
            var any = false
            for (b in data.batches(plan.batchSize, rng)) {
                any = true
                yield(b)
                if (--left == 0) return@sequence
            }
            if (!any) return@sequence // an empty epoch would loop forever
        }
    }

    private fun withLocal(params: FloatArray, index: IntArray, local: LocalLayers?): FloatArray {
        val saved = (if (index.isNotEmpty()) local?.load(index.size) else null) ?: return params
        val mine = params.copyOf()
        for ((k, i) in index.withIndex()) mine[i] = saved[k]
        return mine
    }

    @JvmStatic
    @JvmOverloads
    fun evaluate(trainer: OrtStepTrainer, data: Dataset, params: FloatArray, local: LocalLayers? = null): EvalResult {
        trainer.setParameters(withLocal(params, if (local != null) trainer.manifest.batchnormIndices() else IntArray(0), local))
        var loss = 0.0
        var correct = 0.0
        var n = 0
        var hasAccuracy = true
        for (batch in data.batches(EVAL_BATCH, Random(0))) {
            val m = trainer.evaluate(batch)
            val k = m.getValue("num_examples").toInt()
            loss += m.getValue("loss") * k
            val acc = m["accuracy"]
            if (acc != null) correct += acc * k else hasAccuracy = false
            n += k
        }
        if (n == 0) throw PlanException("nothing to evaluate: the dataset yielded no batch")
        return EvalResult(loss / n, n, if (hasAccuracy) correct / n else null)
    }
}
