/**
 * The tensor frame: the self-describing binary container of every tensor on the wire.
 *
 * Byte layout and check order: docs/protocol.md, "Tensor frame" (the Python reference is
 * edge_sdk/frame.py; both are pinned by tests/vectors). What a codec's payload means belongs
 * to [dev.fedge.android.codec].
 */
package dev.fedge.android.frame

import java.io.ByteArrayOutputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.zip.CRC32
import java.util.zip.DataFormatException
import java.util.zip.Deflater
import java.util.zip.Inflater

/** A frame that is truncated, corrupt, oversized or not understood (`malformed_frame`). */
class FrameException(message: String) : IllegalArgumentException(message)

/** Codec and dtype ids, flags and limits of frame format version 1. */
object FrameFormat {
    val MAGIC = byteArrayOf(0x46, 0x45, 0x44, 0x47) // "FEDG"
    const val VERSION = 1
    const val MAX_NDIM = 8
    const val FIXED_HEADER = 12

    const val CODEC_RAW = 1
    const val CODEC_FP16 = 2
    const val CODEC_QINT = 3
    const val CODEC_TOPK = 4

    const val FLAG_DEFLATE = 0x01

    const val DTYPE_FLOAT32 = 1
    const val DTYPE_FLOAT16 = 2

    /** dtype id -> item size in bytes (float32, float16, float64, int8, uint8, int32, int64). */
    private val ITEM_SIZES = mapOf(1 to 4, 2 to 2, 3 to 8, 4 to 1, 5 to 1, 6 to 4, 7 to 8)

    fun itemSize(dtype: Int): Int =
        ITEM_SIZES[dtype] ?: throw IllegalArgumentException("unknown dtype id $dtype")

    fun isCodec(id: Int): Boolean = id in CODEC_RAW..CODEC_TOPK

    fun isDtype(id: Int): Boolean = id in ITEM_SIZES

    /**
     * The largest codec payload a valid frame of this kind can carry: bounds what a deflated
     * payload may inflate to, so a small hostile frame cannot make the reader allocate much.
     */
    fun maxPayloadSize(codec: Int, dtype: Int, numElements: Long): Long =
        if (codec == CODEC_RAW) numElements * itemSize(dtype) else 8 * numElements + 64
}

/** A decoded frame: the header fields and the codec payload, already inflated. */
class Frame(
    val codec: Int,
    val dtype: Int,
    val shape: LongArray,
    val flags: Int,
    val payload: ByteArray,
) {
    val numElements: Long get() = shape.fold(1L) { a, d -> a * d }

    companion object {
        /** Builds a frame; with [FrameFormat.FLAG_DEFLATE] the payload is deflated here (zlib). */
        @JvmStatic
        @JvmOverloads
        fun encode(codec: Int, dtype: Int, shape: LongArray, payload: ByteArray, flags: Int = 0): ByteArray {
            require(FrameFormat.isCodec(codec)) { "unknown codec id $codec" }
            require(FrameFormat.isDtype(dtype)) { "unknown dtype id $dtype" }
            require(codec == FrameFormat.CODEC_RAW || dtype == FrameFormat.DTYPE_FLOAT32) {
                "codec $codec carries float32 tensors only"
            }
            require(flags and FrameFormat.FLAG_DEFLATE.inv() == 0) { "unknown flag bits $flags" }
            require(shape.size <= FrameFormat.MAX_NDIM) { "ndim ${shape.size} exceeds ${FrameFormat.MAX_NDIM}" }
            require(shape.all { it in 0..0xFFFFFFFFL }) { "a dimension is outside 0..2^32-1" }
            val n = shape.fold(1L) { a, d -> a * d }
            require(codec != FrameFormat.CODEC_RAW || payload.size.toLong() == n * FrameFormat.itemSize(dtype)) {
                "raw payload length does not match shape and dtype"
            }
            val stored = if (flags and FrameFormat.FLAG_DEFLATE != 0) deflate(payload) else payload
            val size = FrameFormat.FIXED_HEADER + 4 * shape.size + 4 + stored.size + 4
            val buf = ByteBuffer.allocate(size).order(ByteOrder.LITTLE_ENDIAN)
            buf.put(FrameFormat.MAGIC)
            buf.put(FrameFormat.VERSION.toByte()).put(codec.toByte()).put(dtype.toByte())
            buf.put(flags.toByte()).put(shape.size.toByte()).put(0).put(0).put(0)
            for (d in shape) buf.putInt(d.toInt())
            buf.putInt(stored.size)
            buf.put(stored)
            val crc = CRC32()
            crc.update(buf.array(), 0, size - 4)
            buf.putInt(crc.value.toInt())
            return buf.array()
        }

        /**
         * Parses and checks a frame; throws [FrameException] saying what is wrong.
         *
         * [maxElements] bounds the element count and [checkHeader] may throw to refuse what a
         * sound header describes; both run before anything is inflated or allocated.
         */
        @JvmStatic
        @JvmOverloads
        fun decode(
            data: ByteArray,
            maxElements: Long? = null,
            checkHeader: ((dtype: Int, shape: LongArray) -> Unit)? = null,
        ): Frame {
            val size = data.size
            if (size < FrameFormat.FIXED_HEADER) {
                val k = minOf(size, 4)
                if (!data.copyOf(k).contentEquals(FrameFormat.MAGIC.copyOf(k))) {
                    throw FrameException("bad magic: not a fedge frame")
                }
                throw FrameException("truncated frame: $size bytes, the fixed header alone is 12")
            }
            val buf = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN)
            if (!data.copyOf(4).contentEquals(FrameFormat.MAGIC)) throw FrameException("bad magic: not a fedge frame")
            val version = u8(data, 4)
            if (version != FrameFormat.VERSION) {
                throw FrameException("unsupported frame format version $version (this reader knows 1)")
            }
            val codec = u8(data, 5)
            val dtype = u8(data, 6)
            val flags = u8(data, 7)
            val ndim = u8(data, 8)
            if (ndim > FrameFormat.MAX_NDIM) throw FrameException("ndim $ndim exceeds ${FrameFormat.MAX_NDIM}")
            val headerEnd = FrameFormat.FIXED_HEADER + 4 * ndim + 4
            if (size < headerEnd + 4) {
                throw FrameException("truncated frame: $size bytes, header and checksum need ${headerEnd + 4}")
            }
            val shape = LongArray(ndim) { u32(buf, FrameFormat.FIXED_HEADER + 4 * it) }
            val storedLen = u32(buf, headerEnd - 4)
            val expected = headerEnd + storedLen + 4
            if (size < expected) throw FrameException("truncated frame: $size bytes, header says $expected")
            if (size > expected) throw FrameException("${size - expected} trailing bytes after the frame")
            val crc = CRC32()
            crc.update(data, 0, size - 4)
            if (crc.value != u32(buf, size - 4)) throw FrameException("checksum mismatch: the frame is corrupt")
            if (!FrameFormat.isCodec(codec)) throw FrameException("unknown codec id $codec")
            if (!FrameFormat.isDtype(dtype)) throw FrameException("unknown dtype id $dtype")
            if (codec != FrameFormat.CODEC_RAW && dtype != FrameFormat.DTYPE_FLOAT32) {
                throw FrameException("codec $codec carries float32 tensors only")
            }
            if (flags and FrameFormat.FLAG_DEFLATE.inv() != 0) throw FrameException("unknown flag bits $flags")
            if (data[9].toInt() != 0 || data[10].toInt() != 0 || data[11].toInt() != 0) {
                throw FrameException("reserved header bytes are not zero")
            }
            // Exact in 64 bits: at most 8 dimensions below 2^32 could overflow, so saturate.
            var n = 1L
            for (d in shape) n = if (d != 0L && n > Long.MAX_VALUE / d) Long.MAX_VALUE else n * d
            if (maxElements != null && n > maxElements) {
                throw FrameException("frame holds $n elements, more than the $maxElements allowed")
            }
            checkHeader?.invoke(dtype, shape)
            val limit = FrameFormat.maxPayloadSize(codec, dtype, n)
            val start = headerEnd
            val payload = if (flags and FrameFormat.FLAG_DEFLATE != 0) {
                inflate(data, start, storedLen.toInt(), limit)
            } else {
                data.copyOfRange(start, start + storedLen.toInt())
            }
            if (payload.size > limit) throw FrameException("payload of ${payload.size} bytes exceeds the $limit this shape allows")
            if (codec == FrameFormat.CODEC_RAW && payload.size.toLong() != limit) {
                throw FrameException("payload length mismatch: ${payload.size} bytes for $n elements")
            }
            return Frame(codec, dtype, shape, flags, payload)
        }

        /** A raw float32 frame holding [values] with [shape] (default: 1-D). */
        @JvmStatic
        @JvmOverloads
        fun encodeFloats(values: FloatArray, shape: LongArray = longArrayOf(values.size.toLong())): ByteArray {
            val buf = ByteBuffer.allocate(4 * values.size).order(ByteOrder.LITTLE_ENDIAN)
            buf.asFloatBuffer().put(values)
            return encode(FrameFormat.CODEC_RAW, FrameFormat.DTYPE_FLOAT32, shape, buf.array())
        }

        private fun u8(data: ByteArray, at: Int): Int = data[at].toInt() and 0xFF

        private fun u32(buf: ByteBuffer, at: Int): Long = buf.getInt(at).toLong() and 0xFFFFFFFFL

        /** zlib at level 6: the same bytes as Python's `zlib.compress(payload, 6)`. */
        private fun deflate(payload: ByteArray): ByteArray {
            val deflater = Deflater(6)
            try {
                deflater.setInput(payload)
                deflater.finish()
                val out = ByteArrayOutputStream(payload.size / 2 + 64)
                val chunk = ByteArray(64 * 1024)
                while (!deflater.finished()) {
                    val k = deflater.deflate(chunk)
                    out.write(chunk, 0, k)
                }
                return out.toByteArray()
            } finally {
                deflater.end()
            }
        }

        private fun inflate(data: ByteArray, offset: Int, length: Int, limit: Long): ByteArray {
            val inflater = Inflater()
            try {
                inflater.setInput(data, offset, length)
                val out = ByteArrayOutputStream()
                val chunk = ByteArray(64 * 1024)
                while (!inflater.finished()) {
                    val k = try {
                        inflater.inflate(chunk)
                    } catch (e: DataFormatException) {
                        throw FrameException("deflate stage: corrupt zlib stream (${e.message})")
                    }
                    if (k == 0 && (inflater.needsInput() || inflater.needsDictionary())) {
                        throw FrameException("deflate stage: truncated zlib stream")
                    }
                    out.write(chunk, 0, k)
                    if (out.size() > limit) {
                        throw FrameException("deflate stage: inflates beyond the $limit bytes this shape allows")
                    }
                }
                if (inflater.remaining > 0) throw FrameException("deflate stage: bytes after the end of the zlib stream")
                return out.toByteArray()
            } finally {
                inflater.end()
            }
        }
    }
}
