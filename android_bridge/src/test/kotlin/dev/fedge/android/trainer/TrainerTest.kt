package dev.fedge.android.trainer

import dev.fedge.android.client.Manifest
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.nio.file.Files
import java.util.Random

/**
 * The trainer on the committed test bundle: it learns, evaluates and predicts, and it refuses,
 * naming what it does not understand, step graphs whose inputs or outputs are not the
 * signature it knows (a newer exporter's batch norm state or dropout seed, another graph).
 * Parity with the Python trainer is tests/android_bridge/test_parity.py.
 */
class TrainerTest {
    private val bundle = File(javaClass.getResource("/bundle/manifest.json")!!.toURI()).parentFile

    private fun copy(): File = Files.createTempDirectory("bundle").toFile().also { bundle.copyRecursively(it, overwrite = true) }

    private fun refusal(dir: File, manifest: Manifest): String {
        try {
            OrtStepTrainer(dir, manifest).close()
            fail("the trainer accepted a graph it does not understand")
        } catch (e: BundleNotSupported) {
            return e.message!!
        }
        throw AssertionError()
    }

    @Test
    fun itLearnsTheBatchItStepsOnAndEvaluates() {
        OrtStepTrainer(bundle, Manifest.load(bundle)).use { t ->
            val rng = Random(0)
            val batch = Batch.classification(FloatArray(32 * 64) { rng.nextFloat() }, LongArray(32) { rng.nextInt(10).toLong() })
            val start = t.getParameters()
            val first = t.trainStep(batch, 0.5f)
            repeat(60) { t.trainStep(batch, 0.5f) }
            val m = t.evaluate(batch)
            assertTrue("loss ${m["loss"]} after 61 steps, $first before", m.getValue("loss") < first * 0.7)
            assertEquals(32.0, m.getValue("num_examples"), 0.0)
            assertTrue(m.getValue("accuracy") in 0.0..1.0)
            assertEquals(32 * 10, t.predict(batch.x).size)
            t.setParameters(start)
            assertEquals(first, t.trainStep(batch, 0.5f), 0f) // the same start, the same loss
        }
    }

    @Test
    fun aStepGraphWithAnotherSignatureIsRefusedByName() {
        val other = copy()
        File(bundle, "eval.onnx").copyTo(File(other, "step.onnx"), overwrite = true)
        val message = refusal(other, Manifest.load(other))
        assertTrue(message, message.contains("step.onnx") && message.contains("unknown: [params, output]"))
    }

    @Test
    fun aManifestPromisingADropoutSeedTheGraphLacksIsRefused() {
        val raw = JSONObject(File(bundle, "manifest.json").readText()).put("step_seed", true)
        val message = refusal(bundle, Manifest(raw))
        assertTrue(message, message.contains("missing: [seed]"))
    }

    @Test
    fun fedProxNeedsItsGraph() {
        val raw = JSONObject(File(bundle, "manifest.json").readText())
        raw.getJSONObject("graphs").remove("step_prox_onnx")
        OrtStepTrainer(bundle, Manifest(raw)).use { t ->
            t.setProximal(null, 0.0) // no term: fine
            try {
                t.setProximal(t.getParameters(), 0.1)
                fail("FedProx without its graph")
            } catch (e: BundleNotSupported) {
                assertTrue(e.message!!.contains("step_prox_onnx"))
            }
        }
    }
}
