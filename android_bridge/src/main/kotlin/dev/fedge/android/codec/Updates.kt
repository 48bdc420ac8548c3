package dev.fedge.android.codec

import dev.fedge.android.frame.Frame
import dev.fedge.android.frame.FrameFormat
import java.util.SplittableRandom

/** An encoded update: the frame to upload and, with error feedback, the residual to keep. */
class EncodedUpdate(val frame: ByteArray, val residual: FloatArray?)

/** Encoding a model delta into a frame and decoding it back (edge_sdk.codecs.update). */
object Updates {
    /** 64 Mi elements: the bound a receiver applies when it does not know the expected length. */
    const val DEFAULT_MAX_ELEMENTS: Long = 1L shl 26

    private val CODECS: Map<String, Codec> = listOf(Float32Codec, Float16Codec, QuantizedCodec, TopKCodec).associateBy { it.name }
    private val BY_FRAME_CODEC: Map<Int, Codec> = CODECS.values.associateBy { it.frameCodec }

    /** The codec names this library speaks, for the check-in's `capabilities.codecs`. */
    @JvmStatic
    val names: List<String> get() = CODECS.keys.toList()

    /** Fresh entropy for stochastic rounding. */
    @JvmStatic
    fun randomUniform(): UniformSource {
        val rng = SplittableRandom()
        return UniformSource { rng.nextDouble() }
    }

    /**
     * The frame of [delta] under [spec]. With error feedback (top-k by default) the codec sees
     * `delta + residual` (null: zeros) and the result carries what it did not deliver.
     */
    @JvmStatic
    @JvmOverloads
    fun encode(
        delta: FloatArray,
        spec: CodecSpec,
        uniform: UniformSource = randomUniform(),
        residual: FloatArray? = null,
    ): EncodedUpdate {
        if (delta.any { !it.isFinite() }) throw CodecException("the update holds NaN or Inf")
        val feedback = spec.usesErrorFeedback
        var v = delta
        if (residual != null) {
            if (!feedback) throw CodecException("codec ${spec.name} without error feedback takes no residual")
            if (residual.size != delta.size || residual.any { !it.isFinite() }) {
                throw CodecException("residual of ${residual.size} elements does not fit ${delta.size}")
            }
            v = FloatArray(delta.size) { delta[it] + residual[it] }
        }
        val codec = CODECS.getValue(spec.name)
        val encoded = codec.encode(v, spec, uniform)
        if (encoded.decoded.any { !it.isFinite() }) {
            throw CodecException("${spec.name}: the update is beyond what the codec can represent")
        }
        val flags = if (spec.entropy) FrameFormat.FLAG_DEFLATE else 0
        val frame = Frame.encode(codec.frameCodec, FrameFormat.DTYPE_FLOAT32, longArrayOf(v.size.toLong()), encoded.payload, flags)
        val newResidual = if (feedback) FloatArray(v.size) { v[it] - encoded.decoded[it] } else null
        return EncodedUpdate(frame, newResidual)
    }

    /**
     * The float32 vector an update (or parameter) frame holds: [dev.fedge.android.frame.FrameException]
     * for a broken frame, [UpdateException] for a sound one that is not 1-D float32 of
     * [expectedLength] or holds NaN/Inf.
     */
    @JvmStatic
    @JvmOverloads
    fun decode(data: ByteArray, expectedLength: Int? = null, maxElements: Long = DEFAULT_MAX_ELEMENTS): FloatArray {
        val frame = Frame.decode(data, maxElements) { dtype, shape ->
            if (shape.size != 1) throw UpdateException("an update is a 1-D vector, this frame has shape ${shape.toList()}")
            if (expectedLength != null && shape[0] != expectedLength.toLong()) {
                throw UpdateException("update has ${shape[0]} elements, the model has $expectedLength")
            }
            if (dtype != FrameFormat.DTYPE_FLOAT32) throw UpdateException("an update is float32, this frame holds dtype $dtype")
        }
        val out = BY_FRAME_CODEC.getValue(frame.codec).decode(frame.payload, frame.shape[0].toInt())
        if (out.any { !it.isFinite() }) throw UpdateException("update decodes to NaN or Inf")
        return out
    }
}
