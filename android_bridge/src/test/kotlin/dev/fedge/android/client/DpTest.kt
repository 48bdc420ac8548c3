package dev.fedge.android.client

import dev.fedge.android.codec.Updates
import dev.fedge.android.os.FakeCoordinator
import dev.fedge.android.protocol.RetryPolicy
import dev.fedge.android.trainer.ArrayDataset
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertSame
import org.junit.Assert.assertThrows
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.nio.file.Files
import java.util.Random

/** Clipping to a DP task's `dp.clip`, against the Python SDK's `edge_sdk.dp.clip_to_norm`. */
class DpTest {
    @Test
    fun clipsBitForBitAsThePythonSdk() {
        val x = floatArrayOf(0.5f, -1.25f, 3.0f, 0.125f, -2.0f, 0.75f, 1.5f, -0.375f)
        // numpy: clip_to_norm(np.array(x, np.float32), 1.0).view(np.uint32)
        val python = intArrayOf(0x3df2d6d7, 0xbe97c646.toInt(), 0x3f362121, 0x3cf2d6d7,
            0xbef2d6d7.toInt(), 0x3e362121, 0x3eb62121, 0xbdb62121.toInt())
        val clipped = Dp.clipToNorm(x, 1.0)
        assertArrayEquals(python, IntArray(x.size) { clipped[it].toRawBits() })
        assertSame(x, Dp.clipToNorm(x, 4.3)) // norm 4.2168 is within: the same array
    }

    /** tests/edge_sdk/test_dp.py's pinned vector: full-mantissa floats over 13 binades, exact. */
    private fun pinnedVector(n: Int = 459) = FloatArray(n) { i ->
        val h = (i.toLong() * 2654435761L) and 0xFFFFFFFFL
        (((h and 0xFFFFFFL) - (1L shl 23)).toDouble() * Math.scalb(1.0, -24) * Math.scalb(1.0, i % 13 - 6)).toFloat()
    }

    @Test
    fun clipsBitForBitWhereASummationOrderWouldShow() {
        val x = pinnedVector()
        // A plain loop sums these squares an ulp short, and at this bound the float scale then
        // rounds the other way; the correctly rounded norm is what Python's math.fsum gives.
        var loop = 0.0
        for (v in x) loop += v.toDouble() * v.toDouble()
        val bound = 36.97016603233627
        val norm = Math.sqrt(Dp.exactSum(DoubleArray(x.size) { x[it].toDouble() * x[it].toDouble() }))
        assertEquals(0x405ecef7d2055c22L, norm.toRawBits()) // Python: math.sqrt(math.fsum(...))
        assertTrue((bound / Math.sqrt(loop)).toFloat() != (bound / norm).toFloat())
        val clipped = Dp.clipToNorm(x, bound)
        // Python: clip_to_norm(pinned_vector(), bound).view(np.uint32), summed and first/last
        assertEquals(966508802657L, clipped.sumOf { it.toRawBits().toLong() and 0xFFFFFFFFL })
        assertEquals(0xbb19999a.toInt(), clipped[0].toRawBits())
        assertEquals(0xbc1a499c.toInt(), clipped[458].toRawBits())
    }

    @Test
    fun theExactSumIsCorrectlyRounded() {
        assertEquals(0.0, Dp.exactSum(DoubleArray(0)), 0.0)
        // 1 + 10,000 x 1e-10: a loop rounds at every step and misses 1.000001 (Python: fsum hits it)
        val many = DoubleArray(10_001) { if (it == 0) 1.0 else 1e-10 }
        assertEquals(1.000001, Dp.exactSum(many), 0.0)
        // a half-way case the last partial decides (math.fsum([1, 2**-53, 2**-80]) == 1 + 2**-52)
        assertEquals(1.0 + Math.ulp(1.0), Dp.exactSum(doubleArrayOf(1.0, Math.scalb(1.0, -53), Math.scalb(1.0, -80))), 0.0)
        assertEquals(1.0, Dp.exactSum(doubleArrayOf(1.0, Math.scalb(1.0, -53), -Math.scalb(1.0, -80))), 0.0)
    }

    @Test
    fun aPlanCarriesTheClipAndRefusesABadOne() {
        val base = JSONObject().put("lr", 0.1).put("epochs", 1)
        assertEquals(null, Plan.fromJson(base).dpClip)
        assertEquals(0.5, Plan.fromJson(JSONObject(base.toString()).put("dp", JSONObject().put("clip", 0.5))).dpClip)
        for (bad in listOf(0, -1.0, "1", true)) {
            val plan = JSONObject(base.toString()).put("dp", JSONObject().put("clip", bad))
            assertThrows(PlanException::class.java) { Plan.fromJson(plan) }
        }
        assertThrows(PlanException::class.java) { Plan.fromJson(JSONObject(base.toString()).put("dp", 1)) }
    }

    private val bundle = File(javaClass.getResource("/bundle/manifest.json")!!.toURI()).parentFile

    /** One pass of a fresh device (same seed and data) against a coordinator handing out [plan]. */
    private fun upload(plan: JSONObject): FloatArray {
        val coordinator = FakeCoordinator(bundle, plan)
        try {
            val rng = Random(3)
            val data = ArrayDataset.classification(FloatArray(40 * 64) { rng.nextFloat() }, 64, LongArray(40) { rng.nextInt(10).toLong() })
            val client = Client(
                coordinator.url, Files.createTempDirectory("device").toFile(), data,
                conditions = { DeviceConditions(charging = true, battery = 0.9, idle = true, unmetered = true) },
                config = ClientConfig(enrollmentToken = coordinator.enrollmentToken, seed = 1, retry = RetryPolicy(maxAttempts = 1)),
            )
            assertEquals(Outcome.TRAINED, client.runOnce().action)
            return Updates.decode(coordinator.uploads.single().second)
        } finally {
            coordinator.close()
        }
    }

    @Test
    fun aDpTasksUploadIsTheTrainedDeltaScaledToTheClip() {
        val plan = { JSONObject().put("steps", 3).put("batch_size", 8).put("lr", 0.5).put("codec", "fp32") }
        val plain = upload(plan())
        val norm = Math.sqrt(plain.sumOf { it.toDouble() * it.toDouble() })
        val clip = norm / 4
        val sent = upload(plan().put("dp", JSONObject().put("clip", clip)))
        val sentNorm = Math.sqrt(sent.sumOf { it.toDouble() * it.toDouble() })
        assertEquals(clip, sentNorm, clip * 1e-6)
        for (i in plain.indices) assertEquals(plain[i] * (clip / norm), sent[i].toDouble(), 1e-7 + 1e-6 * Math.abs(sent[i]))
        assertTrue(sent.any { it != 0f })
        // a clip longer than the delta leaves it as it was
        assertArrayEquals(plain, upload(plan().put("dp", JSONObject().put("clip", 2 * norm))), 0f)
    }
}
