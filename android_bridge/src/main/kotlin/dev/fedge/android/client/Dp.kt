package dev.fedge.android.client

/**
 * Differential privacy on the device, as `edge_sdk/dp.py`: a DP-FedAvg task's plan carries
 * `dp.clip`, and the delta is scaled down to that L2 norm before it is encoded, so that the
 * coordinator's Gaussian noise, calibrated to the clip, covers what this device says.
 */
object Dp {
    /** [x] scaled to L2 norm [bound] if it is longer; [x] itself (same array) if not. */
    @JvmStatic
    fun clipToNorm(x: FloatArray, bound: Double): FloatArray {
        // In doubles, as the Python SDK's numpy (float32 squares summed in float64).
        var sum = 0.0
        for (v in x) sum += v.toDouble() * v.toDouble()
        val norm = Math.sqrt(sum)
        if (norm <= bound) return x
        // numpy multiplies a float32 array by a Python float in float32: the same here.
        val scale = (bound / norm).toFloat()
        return FloatArray(x.size) { x[it] * scale }
    }
}
