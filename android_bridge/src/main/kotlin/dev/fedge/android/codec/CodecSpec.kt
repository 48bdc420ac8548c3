/**
 * Delta codecs, byte-compatible with edge_sdk.codecs: the codec spec a task's plan names, the
 * codecs (fp32, fp16, int8 with 8/4/2 bits and stochastic rounding, top-k), the deflate stage,
 * error feedback and its on-device residual. Layouts: docs/protocol.md, "Codecs".
 */
package dev.fedge.android.codec

import org.json.JSONObject

/** A plan's codec that is malformed: unknown codec or key, wrong type, value out of range. */
class CodecSpecException(message: String) : IllegalArgumentException(message)

/** The encoder cannot represent this input (NaN/Inf, beyond the codec's range). */
class CodecException(message: String) : IllegalArgumentException(message)

/** A sound frame that is not an acceptable update: not 1-D, wrong length, NaN/Inf (`bad_update`). */
class UpdateException(message: String) : IllegalArgumentException(message)

/** A validated codec choice, parsed from a plan's `codec` object with [fromJson]. */
data class CodecSpec @JvmOverloads constructor(
    val name: String = "fp32",
    val bits: Int = 8,
    val block: Int = 256,
    val fraction: Double? = null,
    val k: Long? = null,
    val values: String = "fp16",
    val entropy: Boolean = false,
    /** null: the codec's default (on for top-k only). */
    val errorFeedback: Boolean? = null,
) {
    init {
        if (name !in NAMES) throw CodecSpecException("unknown codec '$name'; known: ${NAMES.joinToString()}")
        if (name == "int8") {
            if (bits !in QINT_BITS) throw CodecSpecException("int8 'bits' must be one of 8, 4, 2, got $bits")
            if (block !in 1..MAX_BLOCK) throw CodecSpecException("int8 'block' must be in 1..$MAX_BLOCK, got $block")
        }
        if (name == "topk") {
            if ((fraction == null) == (k == null)) throw CodecSpecException("topk needs exactly one of 'fraction' and 'k'")
            if (fraction != null && !(fraction.isFinite() && fraction > 0.0 && fraction <= 1.0)) {
                throw CodecSpecException("topk 'fraction' must be in (0, 1], got $fraction")
            }
            if (k != null && k < 1) throw CodecSpecException("topk 'k' must be at least 1, got $k")
            if (values !in TOPK_VALUES) throw CodecSpecException("topk 'values' must be fp32 or fp16, got '$values'")
        }
    }

    val usesErrorFeedback: Boolean get() = errorFeedback ?: (name == "topk")

    /** How many entries a top-k frame of an [n]-element vector keeps. */
    fun topkCount(n: Int): Int {
        if (k != null) return minOf(k, n.toLong()).toInt()
        if (n == 0) return 0
        // Python's round(): half to even, as the reference encoder does.
        return minOf(n.toLong(), maxOf(1L, Math.rint(fraction!! * n).toLong())).toInt()
    }

    companion object {
        val NAMES = listOf("fp32", "fp16", "int8", "topk")
        private val QINT_BITS = listOf(8, 4, 2)
        private val TOPK_VALUES = listOf("fp32", "fp16")
        const val MAX_BLOCK = 1 shl 20
        private val COMMON = setOf("name", "entropy", "error_feedback")
        private val KEYS = mapOf(
            "fp32" to COMMON,
            "fp16" to COMMON,
            "int8" to COMMON + setOf("bits", "block"),
            "topk" to COMMON + setOf("fraction", "k", "values"),
        )

        /** Parses a plan's `codec`: an object like `{"name": "int8"}` or a bare name string. */
        @JvmStatic
        fun fromJson(obj: Any?): CodecSpec {
            val o = when (obj) {
                is String -> JSONObject().put("name", obj)
                is JSONObject -> obj
                else -> throw CodecSpecException("codec must be an object like {\"name\": \"int8\"}, got $obj")
            }
            val name = o.opt("name") as? String ?: throw CodecSpecException("codec needs a string 'name'")
            val allowed = KEYS[name] ?: throw CodecSpecException("unknown codec '$name'; known: ${NAMES.joinToString()}")
            val unknown = o.keys().asSequence().filter { it !in allowed }.toList()
            if (unknown.isNotEmpty()) throw CodecSpecException("unknown keys for codec '$name': ${unknown.sorted().joinToString()}")
            val fraction = if (o.has("fraction")) number(o, "fraction") else null
            val values = o.opt("values") ?: "fp16"
            if (values !is String) throw CodecSpecException("topk 'values' must be a string, got $values")
            return CodecSpec(
                name = name,
                bits = if (o.has("bits")) integer(o, "bits").toInt() else 8,
                block = if (o.has("block")) integer(o, "block").coerceIn(0, Int.MAX_VALUE.toLong()).toInt() else 256,
                fraction = fraction,
                k = if (o.has("k")) integer(o, "k") else null,
                values = values,
                entropy = bool(o, "entropy") ?: false,
                errorFeedback = bool(o, "error_feedback"),
            )
        }

        private fun integer(o: JSONObject, key: String): Long {
            val v = o.get(key)
            if (v is Int || v is Long || v is Short || v is Byte) return (v as Number).toLong()
            if (v is java.math.BigInteger) return if (v.signum() < 0) Long.MIN_VALUE else Long.MAX_VALUE
            throw CodecSpecException("codec '$key' must be an integer, got $v")
        }

        private fun number(o: JSONObject, key: String): Double {
            val v = o.get(key)
            if (v is Number) return v.toDouble()
            throw CodecSpecException("codec '$key' must be a number, got $v")
        }

        private fun bool(o: JSONObject, key: String): Boolean? {
            if (!o.has(key) || o.isNull(key)) return null
            return o.get(key) as? Boolean ?: throw CodecSpecException("codec '$key' must be true or false")
        }
    }
}
