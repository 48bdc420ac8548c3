package dev.fedge.android.trainer

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OnnxValue
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import dev.fedge.android.client.Manifest
import java.io.Closeable
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.FloatBuffer
import java.nio.LongBuffer

/** This trainer cannot run this bundle (a graph with inputs it does not understand, a dtype it lacks). */
class BundleNotSupported(message: String) : Exception(message)

/**
 * `ort-step`: the bundle's portable `step.onnx` (and `step_prox.onnx` for FedProx) on a plain
 * [OrtSession], with the parameters and optimizer state carried between steps.
 *
 * The step graph is a pure function: inputs `params.<p>..., buffers.<b>..., state.<s>[.<p>]...,
 * x, y, lr[, seed]` (plus `anchor.<p>..., mu` for FedProx), outputs `loss, params_out.<p>...,
 * buffers_out.<b>..., state_out...` (edge_sdk/bundle.py; buffers are batch norm statistics,
 * `seed` a fresh int64 per step for dropout masks). A graph with any other input or output is
 * refused with [BundleNotSupported] naming it. Two copies of the flat parameter and state vectors live in direct
 * buffers; a step reads one through zero-copy tensor views and ORT writes the other through
 * pinned outputs, then the two swap, so no step copies the parameters.
 */
class OrtStepTrainer @JvmOverloads constructor(
    val bundleDir: File,
    val manifest: Manifest,
    threads: Int = 1,
) : Closeable {
    private val env = OrtEnvironment.getEnvironment()
    private val specs = manifest.parameters
    private val buffers = manifest.buffers
    private val n = manifest.numParameters
    private val inputShape: LongArray
    private val features: Int
    private val classification: Boolean
    private val targetWidth: Int
    private val stateSpecs: List<Pair<String, LongArray>>

    // Two copies (index 0 and 1): one flat parameter buffer and one buffer per state tensor each.
    private val params = Array(2) { floatBuffer(n) }
    private val state: Array<List<FloatBuffer>>
    private val views: Array<List<OnnxTensor>> // per copy: parameter views, then state views
    private val loss = floatBuffer(1)
    private val lossTensor: OnnxTensor
    private var current = 0
    private val lrBuf = floatBuffer(1)
    private val lrTensor: OnnxTensor
    private val muBuf = floatBuffer(1)
    private val muTensor: OnnxTensor
    private val anchor = floatBuffer(n)
    private val anchorViews: List<OnnxTensor>
    private var proximal = false
    private val seedBuf = ByteBuffer.allocateDirect(8).order(ByteOrder.nativeOrder()).asLongBuffer()
    private val seedTensor: OnnxTensor
    private val seeds = java.util.Random()

    private val options = OrtSession.SessionOptions().apply {
        setIntraOpNumThreads(threads)
        setInterOpNumThreads(1)
    }
    private val step: OrtSession
    private val stepProx: OrtSession?
    private val evalSession: OrtSession
    private val inferSession: OrtSession
    private val stepNames: Pair<List<String>, List<String>>
    private val proxNames: Pair<List<String>, List<String>>
    // Outputs ORT did not write into the pinned buffer (a graph output that is an input as it
    // is): found on each direction's first step, copied from the input afterwards.
    private val passThrough = HashMap<Pair<Boolean, Int>, List<Int>>()

    /** The bundle's default learning rate. */
    val defaultLr: Float = manifest.raw.getJSONObject("optimizer").getDouble("lr").toFloat()

    init {
        val raw = manifest.raw
        val input = raw.getJSONObject("input")
        if (input.getString("dtype") != "float32") throw BundleNotSupported("input dtype ${input.getString("dtype")}: this trainer feeds float32 only")
        val shapeJson = input.getJSONArray("shape")
        inputShape = LongArray(shapeJson.length() - 1) { shapeJson.getLong(it + 1) }
        features = inputShape.fold(1L) { a, d -> a * d }.toInt()
        val target = raw.getJSONObject("target")
        classification = target.getString("dtype") == "int64"
        val tShape = target.getJSONArray("shape")
        targetWidth = (1 until tShape.length()).fold(1) { a, i -> a * tShape.getInt(i) }
        val stateJson = raw.getJSONArray("optimizer_state")
        stateSpecs = (0 until stateJson.length()).map {
            val s = stateJson.getJSONObject(it)
            Pair(s.getString("name"), Manifest.longs(s.getJSONArray("shape")))
        }
        state = Array(2) { stateSpecs.map { (_, shape) -> floatBuffer(shape.fold(1L) { a, d -> a * d }.toInt()) } }
        views = Array(2) { c -> tensorViews(params[c], state[c]) }
        lossTensor = OnnxTensor.createTensor(env, loss, LongArray(0))
        lrTensor = OnnxTensor.createTensor(env, lrBuf, LongArray(0))
        muTensor = OnnxTensor.createTensor(env, muBuf, LongArray(0))
        seedTensor = OnnxTensor.createTensor(env, seedBuf, LongArray(0))
        anchorViews = specs.map { slice(anchor, it.offset, it.size, it.shape) }
        read(File(bundleDir, raw.getString("initial_parameters")), params[0])

        stepNames = signature(proximal = false)
        proxNames = signature(proximal = true)
        step = open("step_onnx", stepNames)
        stepProx = if (raw.optJSONObject("graphs")?.opt("step_prox_onnx") is String) open("step_prox_onnx", proxNames) else null
        evalSession = open("eval_onnx", Pair(listOf("params", "x", "y"), listOf("loss", "output")))
        inferSession = open("infer_onnx", Pair(listOf("params", "x"), listOf("output")))
    }

    /** The step graph's input and output names (edge_sdk.bundle.step_signature). */
    private fun signature(proximal: Boolean): Pair<List<String>, List<String>> {
        val names = specs.map { it.name }
        val inputs = (names.map { "params.$it" } + buffers.map { "buffers.${it.name}" }).toMutableList()
        val outputs = (listOf("loss") + names.map { "params_out.$it" } + buffers.map { "buffers_out.${it.name}" }).toMutableList()
        for ((name, shape) in stateSpecs) {
            if (shape.isNotEmpty()) {
                inputs += names.map { "state.$name.$it" }
                outputs += names.map { "state_out.$name.$it" }
            } else {
                inputs += "state.$name"
                outputs += "state_out.$name"
            }
        }
        inputs += listOf("x", "y", "lr")
        if (manifest.stepSeed) inputs += "seed"
        if (proximal) inputs += names.map { "anchor.$it" } + "mu"
        return Pair(inputs, outputs)
    }

    /** Opens graph [key] and refuses it unless its inputs and outputs are exactly [expected]. */
    private fun open(key: String, expected: Pair<List<String>, List<String>>): OrtSession {
        val file = File(bundleDir, manifest.graph(key))
        val session = env.createSession(file.path, options)
        val inputs = session.inputNames.toList()
        val outputs = session.outputNames.toList()
        if (inputs.toSet() != expected.first.toSet() || outputs.toSet() != expected.second.toSet()) {
            val unknown = (inputs - expected.first.toSet()) + (outputs - expected.second.toSet())
            val missing = (expected.first - inputs.toSet()) + (expected.second - outputs.toSet())
            session.close()
            throw BundleNotSupported(
                "${file.name} does not have the step signature this trainer understands " +
                    "(unknown: $unknown, missing: $missing); a newer fedge-android may support it",
            )
        }
        return session
    }

    private fun tensorViews(flat: FloatBuffer, stateBufs: List<FloatBuffer>): List<OnnxTensor> {
        val out = (specs + buffers).map { slice(flat, it.offset, it.size, it.shape) }.toMutableList()
        for ((k, pair) in stateSpecs.withIndex()) {
            val buf = stateBufs[k]
            out += if (pair.second.isNotEmpty()) specs.map { slice(buf, it.offset, it.size, it.shape) } else listOf(OnnxTensor.createTensor(env, buf, LongArray(0)))
        }
        return out
    }

    private fun slice(buf: FloatBuffer, offset: Int, size: Int, shape: LongArray): OnnxTensor {
        val dup = buf.duplicate()
        dup.position(offset)
        dup.limit(offset + size)
        return OnnxTensor.createTensor(env, dup.slice(), shape)
    }

    /** A copy of the trainable parameters as one flat vector in the manifest's layout. */
    fun getParameters(): FloatArray {
        val out = FloatArray(n)
        params[current].duplicate().apply { rewind() }.get(out)
        return out
    }

    fun setParameters(vec: FloatArray) {
        checkVector(vec, "parameter vector")
        params[current].duplicate().apply { rewind() }.put(vec)
    }

    /** Zeroes the optimizer state (momentum, Adam moments, step count). */
    fun resetOptimizer() {
        for (buf in state[current]) for (i in 0 until buf.capacity()) buf.put(i, 0f)
    }

    /** FedProx: later steps add `mu/2 ||w - anchor||^2` to the loss (mu = 0 turns it off). */
    fun setProximal(anchorVec: FloatArray?, mu: Double) {
        require(mu.isFinite() && mu >= 0) { "proximal mu must be finite and >= 0, got $mu" }
        if (mu == 0.0) {
            proximal = false
            return
        }
        if (stepProx == null) throw BundleNotSupported("bundle ${manifest.bundleId.take(12)} has no FedProx graph (step_prox_onnx)")
        checkVector(requireNotNull(anchorVec) { "a proximal term with mu > 0 needs an anchor" }, "anchor")
        anchor.duplicate().apply { rewind() }.put(anchorVec)
        muBuf.put(0, mu.toFloat())
        proximal = true
    }

    /** One optimizer step on [batch]; the batch's data loss before the step. */
    @JvmOverloads
    fun trainStep(batch: Batch, lr: Float = defaultLr): Float {
        require(lr.isFinite() && lr >= 0f) { "learning rate must be finite and >= 0, got $lr" }
        lrBuf.put(0, lr)
        val (x, y) = batchTensors(batch)
        try {
            val session = if (proximal) stepProx!! else step
            val names = if (proximal) proxNames else stepNames
            val src = views[current]
            val dst = views[1 - current]
            val inputs = HashMap<String, OnnxTensor>()
            val tensorCount = src.size
            for (i in 0 until tensorCount) inputs[names.first[i]] = src[i]
            inputs["x"] = x
            inputs["y"] = y
            inputs["lr"] = lrTensor
            if (manifest.stepSeed) {
                seedBuf.put(0, seeds.nextLong())
                inputs["seed"] = seedTensor
            }
            if (proximal) {
                for ((i, spec) in specs.withIndex()) inputs["anchor.${spec.name}"] = anchorViews[i]
                inputs["mu"] = muTensor
            }
            val pinned = LinkedHashMap<String, OnnxValue>()
            pinned[names.second[0]] = lossTensor
            for (i in 0 until tensorCount) pinned[names.second[i + 1]] = dst[i]
            val key = Pair(proximal, current)
            val probe = key !in passThrough
            if (probe) for (t in dst) fill(t, Float.NaN)
            session.run(inputs, pinned).close()
            if (probe) passThrough[key] = dst.indices.filter { allNaN(dst[it]) && !allNaN(src[it]) }
            for (i in passThrough.getValue(key)) copy(src[i], dst[i])
            current = 1 - current
            return loss.get(0)
        } finally {
            x.close()
            y.close()
        }
    }

    /** `loss`, `num_examples` and, for classification, `accuracy` of the current parameters on [batch]. */
    fun evaluate(batch: Batch): Map<String, Double> {
        val (x, y) = batchTensors(batch)
        val p = OnnxTensor.createTensor(env, params[current].duplicate().apply { rewind() }, longArrayOf(n.toLong()))
        try {
            evalSession.run(mapOf("params" to p, "x" to x, "y" to y)).use { result ->
                val lossValue = (result.get("loss").get() as OnnxTensor).floatBuffer.get(0).toDouble()
                val output = (result.get("output").get() as OnnxTensor).floatBuffer
                val metrics = linkedMapOf("loss" to lossValue, "num_examples" to batch.size.toDouble())
                accuracy(output, batch)?.let { metrics["accuracy"] = it }
                return metrics
            }
        } finally {
            p.close(); x.close(); y.close()
        }
    }

    /** The model's outputs for a batch of inputs ([x] holds whole examples), flat in C order. */
    fun predict(x: FloatArray): FloatArray {
        val rows = x.size / features
        val xt = OnnxTensor.createTensor(env, FloatBuffer.wrap(x), longArrayOf(rows.toLong()) + inputShape)
        val p = OnnxTensor.createTensor(env, params[current].duplicate().apply { rewind() }, longArrayOf(n.toLong()))
        try {
            inferSession.run(mapOf("params" to p, "x" to xt)).use { result ->
                val out = (result.get(0) as OnnxTensor).floatBuffer
                return FloatArray(out.remaining()).also { out.get(it) }
            }
        } finally {
            p.close(); xt.close()
        }
    }

    private fun accuracy(output: FloatBuffer, batch: Batch): Double? {
        val loss = manifest.loss
        if (loss == "cross_entropy") {
            val classes = output.capacity() / batch.size
            var correct = 0
            for (r in 0 until batch.size) {
                var best = 0
                for (c in 1 until classes) if (output.get(r * classes + c) > output.get(r * classes + best)) best = c
                if (best.toLong() == batch.labels!![r]) correct++
            }
            return correct.toDouble() / batch.size
        }
        if (loss == "bce") {
            val t = batch.targets!!
            return (0 until t.size).count { (output.get(it) > 0f) == (t[it] > 0.5f) }.toDouble() / t.size
        }
        return null
    }

    private fun batchTensors(batch: Batch): Pair<OnnxTensor, OnnxTensor> {
        require(batch.size >= 1 && batch.x.size == batch.size * features) {
            "x holds ${batch.x.size} floats; the bundle needs ${batch.size} x $features"
        }
        require(batch.x.all { it.isFinite() }) { "x holds NaN or Inf" }
        val x = OnnxTensor.createTensor(env, FloatBuffer.wrap(batch.x), longArrayOf(batch.size.toLong()) + inputShape)
        val y = if (classification) {
            val labels = requireNotNull(batch.labels) { "this bundle needs class labels" }
            val classes = manifest.numClasses ?: Int.MAX_VALUE
            require(labels.all { it in 0 until classes }) { "labels outside [0, $classes)" }
            OnnxTensor.createTensor(env, LongBuffer.wrap(labels), longArrayOf(batch.size.toLong()))
        } else {
            val t = requireNotNull(batch.targets) { "this bundle needs float targets" }
            require(t.size == batch.size * targetWidth && t.all { it.isFinite() }) { "targets do not fit the bundle" }
            val shape = if (targetWidth == 1 && manifest.raw.getJSONObject("target").getJSONArray("shape").length() == 1) {
                longArrayOf(batch.size.toLong())
            } else {
                val ts = manifest.raw.getJSONObject("target").getJSONArray("shape")
                LongArray(ts.length()) { if (it == 0) batch.size.toLong() else ts.getLong(it) }
            }
            OnnxTensor.createTensor(env, FloatBuffer.wrap(t), shape)
        }
        return Pair(x, y)
    }

    private fun checkVector(vec: FloatArray, what: String) {
        require(vec.size == n) { "$what has ${vec.size} elements; the bundle needs $n" }
        require(vec.all { it.isFinite() }) { "$what holds NaN or Inf" }
    }

    override fun close() {
        for (s in listOfNotNull(step, stepProx, evalSession, inferSession)) s.close()
        for (c in views) for (t in c) t.close()
        for (t in anchorViews) t.close()
        lossTensor.close(); lrTensor.close(); muTensor.close(); seedTensor.close()
        options.close()
    }

    private companion object {
        fun floatBuffer(size: Int): FloatBuffer =
            ByteBuffer.allocateDirect(4 * maxOf(size, 1)).order(ByteOrder.nativeOrder()).asFloatBuffer().also { it.limit(size) }

        fun read(file: File, into: FloatBuffer) {
            val bytes = file.readBytes()
            val want = into.capacity().coerceAtMost(into.limit()) * 4
            if (bytes.size != want) throw BundleNotSupported("${file.name} holds ${bytes.size / 4} floats, the manifest says ${want / 4}")
            into.duplicate().apply { rewind() }.put(ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer())
        }

        fun fill(t: OnnxTensor, v: Float) {
            val direct = t.bufferRef.orElse(null) as? FloatBuffer ?: return
            for (i in 0 until direct.capacity()) direct.put(i, v)
        }

        fun allNaN(t: OnnxTensor): Boolean {
            val direct = t.bufferRef.orElse(null) as? FloatBuffer ?: return false
            return (0 until direct.capacity()).all { direct.get(it).isNaN() }
        }

        fun copy(src: OnnxTensor, dst: OnnxTensor) {
            val s = src.bufferRef.get() as FloatBuffer
            val d = dst.bufferRef.get() as FloatBuffer
            for (i in 0 until s.capacity()) d.put(i, s.get(i))
        }
    }
}
