package dev.fedge.android.client

/**
 * Differential privacy on the device, as `edge_sdk/dp.py`: a DP-FedAvg task's plan carries
 * `dp.clip`, and the delta is scaled down to that L2 norm before it is encoded, so that the
 * coordinator's Gaussian noise, calibrated to the clip, covers what this device says.
 */
object Dp {
    /**
     * [x] scaled to L2 norm [bound] if it is longer; [x] itself (same array) if not. The norm is
     * the correctly rounded one (float squares are exact in doubles, [exactSum] rounds their sum
     * once), as the Python SDK's `math.fsum`: the same bits whatever order either side sums in.
     */
    @JvmStatic
    fun clipToNorm(x: FloatArray, bound: Double): FloatArray {
        val norm = Math.sqrt(exactSum(DoubleArray(x.size) { x[it].toDouble() * x[it].toDouble() }))
        if (norm <= bound) return x
        // numpy multiplies a float32 array by a Python float in float32: the same here.
        val scale = (bound / norm).toFloat()
        return FloatArray(x.size) { x[it] * scale }
    }

    /**
     * The sum of finite [values] rounded once from the exact sum: Shewchuk's non-overlapping
     * partials with the final half-even correction, step for step CPython's `math.fsum`.
     */
    @JvmStatic
    fun exactSum(values: DoubleArray): Double {
        var p = DoubleArray(32)
        var n = 0
        for (v in values) {
            var x = v
            var i = 0
            for (j in 0 until n) {
                var y = p[j]
                if (Math.abs(x) < Math.abs(y)) { val t = x; x = y; y = t }
                val hi = x + y
                val lo = y - (hi - x)
                if (lo != 0.0) p[i++] = lo
                x = hi
            }
            n = i
            if (x != 0.0) {
                if (n == p.size) p = p.copyOf(2 * n)
                p[n++] = x
            }
        }
        if (n == 0) return 0.0
        var hi = p[--n]
        var lo = 0.0
        while (n > 0) { // add the partials from the top until a sum is inexact
            val x = hi
            val y = p[--n]
            hi = x + y
            lo = y - (hi - x)
            if (lo != 0.0) break
        }
        // Round half to even across partials: a tie broken by the rest's sign goes its way.
        if (n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0))) {
            val y = lo * 2.0
            val x = hi + y
            if (y == x - hi) hi = x
        }
        return hi
    }
}
