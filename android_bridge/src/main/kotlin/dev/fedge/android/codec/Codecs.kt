package dev.fedge.android.codec

import dev.fedge.android.frame.FrameException
import dev.fedge.android.frame.FrameFormat
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** Uniform draws in [0, 1) for stochastic rounding (tests plug in numpy's generator). */
fun interface UniformSource {
    fun nextDouble(): Double
}

/** A payload and the vector a receiver will decode from it (error feedback keeps the difference). */
class Encoded(val payload: ByteArray, val decoded: FloatArray)

/** Turns a finite float32 vector into a frame payload and back; layouts in docs/protocol.md. */
internal interface Codec {
    val name: String
    val frameCodec: Int

    fun encode(vec: FloatArray, spec: CodecSpec, uniform: UniformSource): Encoded

    /** The [n]-element vector a payload holds; [FrameException] if it breaks the layout. */
    fun decode(payload: ByteArray, n: Int): FloatArray
}

private fun le(size: Int): ByteBuffer = ByteBuffer.allocate(size).order(ByteOrder.LITTLE_ENDIAN)

private fun le(bytes: ByteArray): ByteBuffer = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)

internal object Float32Codec : Codec {
    override val name = "fp32"
    override val frameCodec = FrameFormat.CODEC_RAW

    override fun encode(vec: FloatArray, spec: CodecSpec, uniform: UniformSource): Encoded {
        val buf = le(4 * vec.size)
        buf.asFloatBuffer().put(vec)
        return Encoded(buf.array(), vec.copyOf())
    }

    override fun decode(payload: ByteArray, n: Int): FloatArray {
        if (payload.size.toLong() != 4L * n) throw FrameException("fp32 payload of ${payload.size} bytes for $n elements")
        val out = FloatArray(n)
        le(payload).asFloatBuffer().get(out)
        return out
    }
}

internal object Float16Codec : Codec {
    override val name = "fp16"
    override val frameCodec = FrameFormat.CODEC_FP16

    override fun encode(vec: FloatArray, spec: CodecSpec, uniform: UniformSource): Encoded {
        val buf = le(2 * vec.size)
        val decoded = FloatArray(vec.size)
        for (i in vec.indices) {
            val h = Half.fromFloat(vec[i])
            decoded[i] = Half.toFloat(h)
            if (decoded[i].isInfinite()) throw CodecException("fp16: magnitude ${vec[i]} is beyond the codec's range")
            buf.putShort(h)
        }
        return Encoded(buf.array(), decoded)
    }

    override fun decode(payload: ByteArray, n: Int): FloatArray {
        if (payload.size.toLong() != 2L * n) throw FrameException("fp16 payload of ${payload.size} bytes for $n elements")
        val buf = le(payload)
        return FloatArray(n) { Half.toFloat(buf.getShort(2 * it)) }
    }
}

/**
 * `int8` with 8, 4 or 2 bits: one float32 scale per block, `q = floor(x / s + u)` with
 * `u ~ U[0, 1)` (unbiased), codes `q + L` packed least-significant bits first.
 */
internal object QuantizedCodec : Codec {
    override val name = "int8"
    override val frameCodec = FrameFormat.CODEC_QINT

    override fun encode(vec: FloatArray, spec: CodecSpec, uniform: UniformSource): Encoded {
        val bits = spec.bits
        val block = spec.block
        val levels = (1 shl (bits - 1)) - 1
        val n = vec.size
        val nblocks = ((n.toLong() + block - 1) / block).toInt()
        val scales = FloatArray(nblocks)
        val codes = ByteArray(((n.toLong() * bits + 7) / 8).toInt())
        val decoded = FloatArray(n)
        for (j in 0 until nblocks) {
            val from = j * block
            val to = minOf(n, from + block)
            var amax = 0f
            for (i in from until to) amax = maxOf(amax, Math.abs(vec[i]))
            var s = amax / levels.toFloat()
            // float32 division can round down; |x| <= L * s must hold exactly (checked in float64).
            if (s.toDouble() * levels < amax.toDouble()) s = Math.nextUp(s)
            scales[j] = s
            val safe = if (s > 0f) s.toDouble() else 1.0
            // One draw per slot of the block, padding included, as the reference encoder does.
            for (slot in 0 until block) {
                val i = from + slot
                val u = uniform.nextDouble()
                if (i >= to) continue
                val q = Math.floor(vec[i].toDouble() / safe + u).toLong().coerceIn(-levels.toLong(), levels.toLong()).toInt()
                val code = q + levels
                val bit = i.toLong() * bits
                val at = (bit / 8).toInt()
                codes[at] = (codes[at].toInt() or (code shl (bit % 8).toInt())).toByte()
                decoded[i] = q.toFloat() * s
            }
        }
        val buf = le(8 + 4 * nblocks + codes.size)
        buf.put(bits.toByte()).put(0).put(0).put(0).putInt(block)
        for (s in scales) buf.putFloat(s)
        buf.put(codes)
        return Encoded(buf.array(), decoded)
    }

    override fun decode(payload: ByteArray, n: Int): FloatArray {
        if (payload.size < 8) throw FrameException("int8 payload of ${payload.size} bytes is shorter than its header")
        val buf = le(payload)
        val bits = payload[0].toInt() and 0xff
        if (bits != 8 && bits != 4 && bits != 2) throw FrameException("int8 payload: bits $bits not in (8, 4, 2)")
        if (payload[1].toInt() != 0 || payload[2].toInt() != 0 || payload[3].toInt() != 0) {
            throw FrameException("int8 payload: reserved bytes are not zero")
        }
        val block = buf.getInt(4).toLong() and 0xFFFFFFFFL
        if (block < 1) throw FrameException("int8 payload: block size 0")
        val nblocks = (n + block - 1) / block
        val codeBytes = (n.toLong() * bits + 7) / 8
        val expected = 8 + 4 * nblocks + codeBytes
        if (payload.size.toLong() != expected) {
            throw FrameException("int8 payload of ${payload.size} bytes; $n elements at $bits bits in blocks of $block need $expected")
        }
        val scales = FloatArray(nblocks.toInt()) { buf.getFloat(8 + 4 * it) }
        if (scales.any { it < 0f }) throw FrameException("int8 payload: negative scale")
        val levels = (1 shl (bits - 1)) - 1
        val mask = (1 shl bits) - 1
        val base = 8 + 4 * nblocks.toInt()
        val out = FloatArray(n)
        for (i in 0 until n) {
            val bit = i.toLong() * bits
            val code = ((payload[base + (bit / 8).toInt()].toInt() and 0xff) ushr (bit % 8).toInt()) and mask
            if (code > 2 * levels) throw FrameException("int8 payload: code $code above ${2 * levels}")
            out[i] = (code - levels).toFloat() * scales[(i / block).toInt()]
        }
        val usedBits = n.toLong() * bits
        if (usedBits % 8 != 0L) {
            val last = payload[payload.size - 1].toInt() and 0xff
            if (last ushr (usedBits % 8).toInt() != 0) {
                throw FrameException("int8 payload: padding bits after the last code are not zero")
            }
        }
        return out
    }
}

/** `topk`: the k largest magnitudes as strictly increasing u32 indices and fp16/fp32 values. */
internal object TopKCodec : Codec {
    override val name = "topk"
    override val frameCodec = FrameFormat.CODEC_TOPK

    override fun encode(vec: FloatArray, spec: CodecSpec, uniform: UniformSource): Encoded {
        val n = vec.size
        val k = spec.topkCount(n)
        val idx = IntArray(k)
        if (k == n) {
            for (i in 0 until k) idx[i] = i
        } else if (k > 0) {
            // The k-th largest magnitude; every larger one is kept, then equal ones in index
            // order until k (any k of tied entries are "the k largest").
            val mags = FloatArray(n) { Math.abs(vec[it]) }
            java.util.Arrays.sort(mags)
            val threshold = mags[n - k]
            val above = vec.count { Math.abs(it) > threshold }
            var ties = k - above
            var m = 0
            for (i in 0 until n) {
                val a = Math.abs(vec[i])
                if (a > threshold || (a == threshold && ties-- > 0)) idx[m++] = i
            }
        }
        val fp16 = spec.values == "fp16"
        val buf = le(8 + k * (if (fp16) 6 else 8))
        buf.put((if (fp16) FrameFormat.DTYPE_FLOAT16 else FrameFormat.DTYPE_FLOAT32).toByte()).put(0).put(0).put(0).putInt(k)
        for (i in idx) buf.putInt(i)
        val decoded = FloatArray(n)
        for (i in idx) {
            if (fp16) {
                val h = Half.fromFloat(vec[i])
                decoded[i] = Half.toFloat(h)
                buf.putShort(h)
            } else {
                decoded[i] = vec[i]
                buf.putFloat(vec[i])
            }
            if (decoded[i].isInfinite()) throw CodecException("topk: a value is beyond the range of ${spec.values}")
        }
        return Encoded(buf.array(), decoded)
    }

    override fun decode(payload: ByteArray, n: Int): FloatArray {
        if (payload.size < 8) throw FrameException("topk payload of ${payload.size} bytes is shorter than its header")
        val buf = le(payload)
        val valueId = payload[0].toInt() and 0xff
        if (valueId != FrameFormat.DTYPE_FLOAT32 && valueId != FrameFormat.DTYPE_FLOAT16) {
            throw FrameException("topk payload: value dtype id $valueId is not fp32 (1) or fp16 (2)")
        }
        if (payload[1].toInt() != 0 || payload[2].toInt() != 0 || payload[3].toInt() != 0) {
            throw FrameException("topk payload: reserved bytes are not zero")
        }
        val k = buf.getInt(4).toLong() and 0xFFFFFFFFL
        if (k > n) throw FrameException("topk payload: k = $k exceeds the $n elements")
        val valueSize = if (valueId == FrameFormat.DTYPE_FLOAT16) 2 else 4
        val expected = 8 + k * (4 + valueSize)
        if (payload.size.toLong() != expected) throw FrameException("topk payload of ${payload.size} bytes; k = $k needs $expected")
        val out = FloatArray(n)
        var previous = -1L
        val valuesAt = 8 + 4 * k.toInt()
        for (m in 0 until k.toInt()) {
            val index = buf.getInt(8 + 4 * m).toLong() and 0xFFFFFFFFL
            if (index <= previous || index >= n) throw FrameException("topk payload: indices are not strictly increasing below n")
            previous = index
            out[index.toInt()] = if (valueSize == 2) Half.toFloat(buf.getShort(valuesAt + 2 * m)) else buf.getFloat(valuesAt + 4 * m)
        }
        return out
    }
}
