package dev.fedge.android.client

import dev.fedge.android.os.FakeCoordinator
import dev.fedge.android.protocol.RetryPolicy
import dev.fedge.android.trainer.ArrayDataset
import org.json.JSONObject
import org.junit.After
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.nio.file.Files
import java.util.Random

/** A SecAgg task's assignment is refused with a clear error, before anything is downloaded or trained. */
class SecAggRefusalTest {
    private val bundle = File(javaClass.getResource("/bundle/manifest.json")!!.toURI()).parentFile
    private val plan = JSONObject().put("steps", 3).put("batch_size", 8).put("lr", 0.05)
        .put("secagg", JSONObject().put("bits", 22).put("clip", 1.0).put("levels", 65536).put("max_weight", 1000).put("stage_timeout_s", 60.0))
    private val coordinator = FakeCoordinator(bundle, plan)
    private val state = Files.createTempDirectory("device").toFile()

    @After
    fun stop() = coordinator.close()

    @Test
    fun aSecAggAssignmentIsRefusedAndItsSlotFreed() {
        val rng = Random(3)
        val data = ArrayDataset.classification(FloatArray(40 * 64) { rng.nextFloat() }, 64, LongArray(40) { rng.nextInt(10).toLong() })
        val client = Client(
            coordinator.url, state, data,
            conditions = { DeviceConditions(charging = true, battery = 0.9, idle = true, unmetered = true) },
            config = ClientConfig(enrollmentToken = coordinator.enrollmentToken, seed = 1, retry = RetryPolicy(maxAttempts = 1)),
        )
        val outcome = client.runOnce()
        assertEquals(Outcome.REJECTED, outcome.action)
        assertEquals(Client.SECAGG_UNSUPPORTED, outcome.error)
        assertTrue(outcome.error!!.startsWith("secagg_unsupported"))
        assertEquals(1, coordinator.aborts.size) // the coordinator was told at once
        val abort = coordinator.aborts[0]
        assertEquals("unsupported", abort.getString("code"))
        assertTrue(abort.getString("message").contains("secure aggregation"))
        assertEquals(0, coordinator.uploads.size) // never an update in the clear
        assertEquals(42.0, outcome.nextRunInS, 42.0 * 0.1 + 1e-9) // paced by the abort's answer
        assertTrue(File(state, "bundles").listFiles().isNullOrEmpty()) // nothing downloaded
    }
}
