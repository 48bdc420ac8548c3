package dev.fedge.android.codec

import dev.fedge.android.client.Plan
import dev.fedge.android.client.PlanException
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.nio.file.Files
import java.util.Random

/** Codec behaviour beyond the vectors: error feedback over rounds, fp16 rounding, spec and plan parsing. */
class CodecTest {
    private fun vec(seed: Long, n: Int) = Random(seed).let { r -> FloatArray(n) { (r.nextGaussian() * 0.01).toFloat() } }

    @Test
    fun errorFeedbackDeliversTheSumOfTheDeltasMinusTheResidual() {
        val spec = CodecSpec.fromJson(JSONObject("""{"name": "topk", "fraction": 0.05}"""))
        assertTrue(spec.usesErrorFeedback)
        val store = ErrorFeedback(File(Files.createTempDirectory("ef").toFile(), "t.f32frame"))
        val n = 1000
        val sent = DoubleArray(n)
        val truth = DoubleArray(n)
        for (round in 0 until 20) {
            val delta = vec(round.toLong(), n)
            val enc = Updates.encode(delta, spec, Updates.randomUniform(), store.load(n))
            store.save(enc.residual)
            val got = Updates.decode(enc.frame, expectedLength = n)
            assertEquals(50, got.count { it != 0f })
            for (i in 0 until n) { sent[i] += got[i].toDouble(); truth[i] += delta[i].toDouble() }
        }
        val residual = store.load(n)!!
        for (i in 0 until n) assertEquals(truth[i] - residual[i], sent[i], 1e-5)
    }

    @Test
    fun stochasticRoundingIsUnbiased() {
        val x = FloatArray(4096) { 0.3f + 0.001f * (it % 7) }
        x[0] = 1f // sets the block's scale
        val spec = CodecSpec("int8", bits = 2, block = 4096)
        val rng = Random(5)
        val mean = DoubleArray(x.size)
        repeat(400) {
            val got = Updates.decode(Updates.encode(x, spec, { rng.nextDouble() }).frame)
            for (i in x.indices) mean[i] += got[i] / 400.0
        }
        val avg = (1 until x.size).map { mean[it] - x[it] }.average()
        assertEquals(0.0, avg, 2e-3) // 2-bit codes are -1, 0, 1 times the scale; the mean is still x
    }

    @Test
    fun halfRoundsToNearestEvenAndRefusesTheOverflow() {
        assertEquals(65504f, Half.toFloat(Half.fromFloat(65519f)))
        assertTrue(Half.toFloat(Half.fromFloat(65520f)).isInfinite())
        assertEquals(1f, Half.toFloat(Half.fromFloat(1f + 1f / 2048))) // tie: to even
        assertEquals(1f + 1f / 512, Half.toFloat(Half.fromFloat(1f + 3f / 2048)))
        assertEquals(5.9604645e-8f, Half.toFloat(Half.fromFloat(5.9604645e-8f))) // smallest subnormal
        assertEquals(0f, Half.toFloat(Half.fromFloat(2.9802322e-8f))) // half of it: ties to 0
        for (bits in 0 until 0x7c00) assertEquals(bits.toShort(), Half.fromFloat(Half.toFloat(bits.toShort())))
        try {
            Updates.encode(floatArrayOf(1e5f), CodecSpec("fp16"))
            fail("fp16 accepted 1e5")
        } catch (e: CodecException) {
        }
    }

    @Test
    fun specsAndPlansAreCheckedLikeThePythonSdk() {
        for (bad in listOf("""{"name": "int8", "bits": 3}""", """{"name": "topk"}""", """{"name": "fp32", "x": 1}""",
            """{"name": "zip"}""", """{"name": "topk", "k": 5, "fraction": 0.1}""")) {
            try {
                CodecSpec.fromJson(JSONObject(bad))
                fail("accepted $bad")
            } catch (e: CodecSpecException) {
            }
        }
        assertEquals(7, CodecSpec("topk", fraction = 0.07).topkCount(100))
        val plan = Plan.fromJson(JSONObject("""{"epochs": 1, "steps": 15, "batch_size": 8, "lr": 0.1, "lr_decay": 0.5,
            "prox_mu": 0.0, "codec": {"name": "int8", "bits": 4, "block": 32}, "recheck_every_steps": 5}"""))
        assertEquals(15, plan.steps)
        assertNull(plan.epochs)
        assertEquals(0.025, plan.lrForRound(2), 1e-12)
        assertEquals(4, plan.codec.bits)
        for (bad in listOf("""{"batch_size": 8}""", """{"lr": -1}""", """{"lr": 0.1, "batch_size": 0}""", """{"lr": 0.1, "batchnorm": "x"}""")) {
            try {
                Plan.fromJson(JSONObject(bad))
                fail("accepted $bad")
            } catch (e: PlanException) {
            }
        }
    }

    @Test
    fun aResidualOfAnotherLengthOrDamagedIsIgnored() {
        val file = File(Files.createTempDirectory("ef").toFile(), "t.f32frame")
        val store = ErrorFeedback(file)
        store.save(floatArrayOf(1f, 2f, 3f))
        assertArrayEquals(floatArrayOf(1f, 2f, 3f), store.load(3)!!, 0f)
        assertNull(store.load(4))
        file.writeBytes(file.readBytes().also { it[20] = (it[20] + 1).toByte() })
        assertNull(store.load(3))
    }
}
