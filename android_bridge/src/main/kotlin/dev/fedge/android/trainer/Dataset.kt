/**
 * Local training on ONNX Runtime's Java API (`ai.onnxruntime`, the same in onnxruntime-android
 * and the desktop jar): the portable step graphs ([OrtStepTrainer]), the app's data
 * ([Dataset]) and one assignment's work ([LocalTraining]).
 */
package dev.fedge.android.trainer

import java.util.Random

/**
 * One batch: [x] holds [size] examples of the bundle's input shape in C order; [labels]
 * (classification, int64 class ids) or [targets] (regression, float32) holds the targets.
 */
class Batch private constructor(val x: FloatArray, val size: Int, val labels: LongArray?, val targets: FloatArray?) {
    companion object {
        @JvmStatic
        fun classification(x: FloatArray, labels: LongArray) = Batch(x, labels.size, labels, null)

        @JvmStatic
        fun regression(x: FloatArray, targets: FloatArray, size: Int) = Batch(x, size, null, targets)
    }
}

/** The app's examples. `batches` yields one epoch; the last batch may be smaller. */
interface Dataset {
    /** The example count reported as the update's weight (null: count what training saw). */
    val numExamples: Int?

    fun batches(batchSize: Int, rng: Random): Iterator<Batch>
}

/** Examples held in memory: [x] is `n x features` floats, [labels] n class ids (or [targets] n x t floats). */
class ArrayDataset private constructor(
    private val x: FloatArray,
    private val features: Int,
    private val labels: LongArray?,
    private val targets: FloatArray?,
    private val n: Int,
) : Dataset {
    init {
        require(n > 0) { "the dataset is empty" }
        require(x.size == n * features) { "x holds ${x.size} floats, not $n x $features" }
    }

    override val numExamples: Int get() = n

    override fun batches(batchSize: Int, rng: Random): Iterator<Batch> {
        require(batchSize >= 1) { "batch_size must be at least 1" }
        val order = IntArray(n) { it }
        for (i in n - 1 downTo 1) { // Fisher-Yates
            val j = rng.nextInt(i + 1)
            val t = order[i]; order[i] = order[j]; order[j] = t
        }
        return (0 until n step batchSize).asSequence().map { start -> take(order.copyOfRange(start, minOf(n, start + batchSize))) }.iterator()
    }

    /** The examples at [idx], in that order, as one batch. */
    fun take(idx: IntArray): Batch {
        val bx = FloatArray(idx.size * features)
        for ((k, i) in idx.withIndex()) System.arraycopy(x, i * features, bx, k * features, features)
        if (labels != null) return Batch.classification(bx, LongArray(idx.size) { labels[idx[it]] })
        val t = targets!!.size / n
        val by = FloatArray(idx.size * t)
        for ((k, i) in idx.withIndex()) System.arraycopy(targets, i * t, by, k * t, t)
        return Batch.regression(bx, by, idx.size)
    }

    companion object {
        @JvmStatic
        fun classification(x: FloatArray, features: Int, labels: LongArray) = ArrayDataset(x, features, labels, null, labels.size)

        @JvmStatic
        fun regression(x: FloatArray, features: Int, targets: FloatArray, n: Int) = ArrayDataset(x, features, null, targets, n)
    }
}
