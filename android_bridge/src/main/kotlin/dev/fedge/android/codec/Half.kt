package dev.fedge.android.codec

/** IEEE binary16 conversions (Java 17 and old Android have none in the standard library). */
internal object Half {
    /** The half nearest to [f] (ties to even), as numpy's `astype(float16)`; beyond ±65504 rounds to Inf. */
    fun fromFloat(f: Float): Short {
        val bits = java.lang.Float.floatToRawIntBits(f)
        val sign = (bits ushr 16) and 0x8000
        val v = bits and 0x7fffffff
        if (v >= 0x7f800000) { // Inf or NaN
            val nan = if (v > 0x7f800000) 0x200 or ((v and 0x7fffff) ushr 13) else 0
            return (sign or 0x7c00 or nan).toShort()
        }
        if (v >= 0x477ff000) return (sign or 0x7c00).toShort() // 65520 and up round to Inf
        val e = v ushr 23
        if (e < 113) { // below the smallest normal half: a subnormal (or zero)
            val shift = 126 - e
            if (shift >= 32) return sign.toShort()
            val m = (v and 0x7fffff) or (if (e == 0) 0 else 0x800000)
            val effShift = if (e == 0) shift - 1 else shift // float subnormals have exponent 1-127
            if (effShift >= 32) return sign.toShort()
            var h = m ushr effShift
            val rem = m and ((1 shl effShift) - 1)
            val half = 1 shl (effShift - 1)
            if (rem > half || (rem == half && (h and 1) == 1)) h++
            return (sign or h).toShort()
        }
        var h = ((e - 112) shl 10) or ((v and 0x7fffff) ushr 13)
        val rem = v and 0x1fff
        if (rem > 0x1000 || (rem == 0x1000 && (h and 1) == 1)) h++
        return (sign or h).toShort()
    }

    /** The float32 equal to half [h] (exact). */
    fun toFloat(h: Short): Float {
        val x = h.toInt() and 0xffff
        val sign = (x and 0x8000) shl 16
        val e = (x ushr 10) and 0x1f
        val m = x and 0x3ff
        val bits = when {
            e == 0 && m == 0 -> sign
            e == 0 -> { // subnormal: normalise
                var mm = m
                var ee = 113
                while (mm and 0x400 == 0) { mm = mm shl 1; ee-- }
                sign or (ee shl 23) or ((mm and 0x3ff) shl 13)
            }
            e == 31 -> sign or 0x7f800000 or (m shl 13)
            else -> sign or ((e + 112) shl 23) or (m shl 13)
        }
        return java.lang.Float.intBitsToFloat(bits)
    }
}
