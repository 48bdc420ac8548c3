/**
 * Command-line entry points the Python tests and benchmarks run on a JVM (not part of the
 * library jar): `device` joins a coordinator's rounds, `parity` runs given batches through the
 * trainer, `bench` times training steps. Data files are raw little-endian arrays (see [RawData]).
 */
package dev.fedge.android.tools

import dev.fedge.android.client.Client
import dev.fedge.android.client.ClientConfig
import dev.fedge.android.client.DeviceConditions
import dev.fedge.android.client.EligibilityPolicy
import dev.fedge.android.client.Manifest
import dev.fedge.android.protocol.RetryPolicy
import dev.fedge.android.protocol.TlsConfig
import dev.fedge.android.trainer.ArrayDataset
import dev.fedge.android.trainer.Batch
import dev.fedge.android.trainer.OrtStepTrainer
import org.json.JSONObject
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.Base64

/** `meta.json` {"n", "features"} + `x.f32` (n x features) + `y.i64` (n labels). */
object RawData {
    fun load(dir: File): ArrayDataset {
        val meta = JSONObject(File(dir, "meta.json").readText())
        val n = meta.getInt("n")
        val features = meta.getInt("features")
        val x = floats(File(dir, "x.f32"))
        val y = longs(File(dir, "y.i64"))
        require(y.size == n)
        return ArrayDataset.classification(x, features, y)
    }

    fun floats(f: File): FloatArray {
        val b = ByteBuffer.wrap(f.readBytes()).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
        return FloatArray(b.remaining()).also { b.get(it) }
    }

    fun longs(f: File): LongArray {
        val b = ByteBuffer.wrap(f.readBytes()).order(ByteOrder.LITTLE_ENDIAN).asLongBuffer()
        return LongArray(b.remaining()).also { b.get(it) }
    }

    fun writeFloats(f: File, v: FloatArray) {
        val b = ByteBuffer.allocate(4 * v.size).order(ByteOrder.LITTLE_ENDIAN)
        b.asFloatBuffer().put(v)
        f.writeBytes(b.array())
    }
}

private fun options(args: Array<String>): Map<String, String> =
    args.toList().chunked(2).associate { (k, v) -> k.removePrefix("--") to v }

fun main(args: Array<String>) {
    val command = args.firstOrNull() ?: error("usage: device|parity|bench --key value ...")
    val opts = options(args.copyOfRange(1, args.size))
    when (command) {
        "device" -> device(opts)
        "parity" -> parity(opts)
        "bench" -> bench(opts)
        else -> error("unknown command $command")
    }
}

/**
 * Runs the client until the file `--stop-file` exists (or `--max-runs` passes), sleeping the
 * pace-steered waits capped at `--max-wait-s`; one JSON line per pass into `--log`, with the
 * uploaded frame (base64) and the coordinator's answer, so the test knows what was acknowledged.
 */
private fun device(o: Map<String, String>) {
    val data = RawData.load(File(o.getValue("data")))
    val client = Client(
        coordinator = o.getValue("coordinator"),
        stateDir = File(o.getValue("state")),
        data = data,
        conditions = { DeviceConditions(charging = true, battery = 0.9, idle = true, unmetered = true) },
        policy = EligibilityPolicy(),
        config = ClientConfig(
            enrollmentToken = o["enrollment-token"],
            seed = o["seed"]?.toLong(),
            retry = RetryPolicy(maxAttempts = 4, baseDelayS = 0.2, maxDelayS = 2.0),
            afterAssignmentS = 0.2,
            failureBackoffS = 0.5,
            maxFailureBackoffS = 2.0,
            tls = if (o["ca-file"] != null || o["pin"] != null) TlsConfig(o["ca-file"]?.let { File(it) }, o["pin"]) else null,
        ),
    )
    val stopFile = File(o.getValue("stop-file"))
    val maxRuns = o["max-runs"]?.toInt() ?: Int.MAX_VALUE
    val maxWait = o["max-wait-s"]?.toDouble() ?: 1.0
    File(o.getValue("log")).printWriter().use { log ->
        var runs = 0
        while (!stopFile.exists() && runs < maxRuns) {
            val outcome = client.runOnce()
            runs++
            val line = JSONObject()
                .put("action", outcome.action)
                .put("next_run_in_s", outcome.nextRunInS)
                .put("assignment_id", outcome.assignmentId ?: JSONObject.NULL)
                .put("task_id", outcome.taskId ?: JSONObject.NULL)
                .put("round", outcome.round ?: JSONObject.NULL)
                .put("error", outcome.error ?: JSONObject.NULL)
                .put("metrics", outcome.metrics)
                .put("answer", outcome.answer ?: JSONObject.NULL)
                .put("reasons", outcome.reasons)
                .put("frame_b64", outcome.uploaded?.let { Base64.getEncoder().encodeToString(it) } ?: JSONObject.NULL)
            log.println(line)
            log.flush()
            Thread.sleep((minOf(outcome.nextRunInS, maxWait) * 1000).toLong())
        }
    }
    client.close()
}

/** Steps over `--batches` (dir with meta.json {"steps", "batch", "features", "lr", "mu"?}, x.f32, y.i64); params to `--out`. */
private fun parity(o: Map<String, String>) {
    val bundle = File(o.getValue("bundle"))
    val dir = File(o.getValue("batches"))
    val meta = JSONObject(File(dir, "meta.json").readText())
    val steps = meta.getInt("steps")
    val batch = meta.getInt("batch")
    val features = meta.getInt("features")
    val x = RawData.floats(File(dir, "x.f32"))
    val y = RawData.longs(File(dir, "y.i64"))
    OrtStepTrainer(bundle, Manifest.load(bundle)).use { t ->
        val start = t.getParameters()
        val mu = meta.optDouble("mu", 0.0)
        t.setProximal(if (mu > 0) start else null, mu)
        val losses = FloatArray(steps)
        for (s in 0 until steps) {
            val bx = x.copyOfRange(s * batch * features, (s + 1) * batch * features)
            val by = y.copyOfRange(s * batch, (s + 1) * batch)
            losses[s] = t.trainStep(Batch.classification(bx, by), meta.getDouble("lr").toFloat())
        }
        RawData.writeFloats(File(o.getValue("out")), t.getParameters())
        RawData.writeFloats(File(o.getValue("out") + ".loss"), losses)
    }
}

/** Times `--steps` steps (after `--warmup`) on random batches of `--batch`; prints JSON. */
private fun bench(o: Map<String, String>) {
    val bundle = File(o.getValue("bundle"))
    val manifest = Manifest.load(bundle)
    val steps = o["steps"]?.toInt() ?: 200
    val warmup = o["warmup"]?.toInt() ?: 20
    val batch = o["batch"]?.toInt() ?: 32
    val repeats = o["repeats"]?.toInt() ?: 5
    val shape = manifest.raw.getJSONObject("input").getJSONArray("shape")
    val features = (1 until shape.length()).fold(1) { a, i -> a * shape.getInt(i) }
    val classes = manifest.numClasses ?: 2
    val rng = java.util.Random(0)
    val batches = (0 until 16).map {
        Batch.classification(FloatArray(batch * features) { rng.nextGaussian().toFloat() }, LongArray(batch) { rng.nextInt(classes).toLong() })
    }
    OrtStepTrainer(bundle, manifest).use { t ->
        repeat(warmup) { t.trainStep(batches[it % batches.size]) }
        val perStep = (0 until repeats).map {
            val t0 = System.nanoTime()
            for (s in 0 until steps) t.trainStep(batches[s % batches.size])
            (System.nanoTime() - t0) / 1e9 / steps
        }
        println(JSONObject().put("step_s", org.json.JSONArray(perStep)).put("steps", steps).put("batch", batch))
    }
}
