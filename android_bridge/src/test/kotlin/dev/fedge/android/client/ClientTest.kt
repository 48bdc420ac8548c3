package dev.fedge.android.client

import dev.fedge.android.codec.Updates
import dev.fedge.android.os.FakeCoordinator
import dev.fedge.android.protocol.RetryPolicy
import dev.fedge.android.trainer.ArrayDataset
import dev.fedge.android.trainer.LocalLayers
import org.json.JSONObject
import org.junit.After
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.nio.file.Files
import java.util.Collections
import java.util.Random

/** The client's pass on a plain JVM (no Android): registration, training, top-k upload, a lost answer. */
class ClientTest {
    private val bundle = File(javaClass.getResource("/bundle/manifest.json")!!.toURI()).parentFile
    private val plan = JSONObject().put("steps", 3).put("batch_size", 8).put("lr", 0.05)
        .put("codec", JSONObject().put("name", "topk").put("fraction", 0.05).put("values", "fp32"))
    private val coordinator = FakeCoordinator(bundle, plan)
    private val state = Files.createTempDirectory("device").toFile()

    private fun client(eligible: () -> Boolean = { true }): Client {
        val rng = Random(3)
        val data = ArrayDataset.classification(FloatArray(40 * 64) { rng.nextFloat() }, 64, LongArray(40) { rng.nextInt(10).toLong() })
        return Client(
            coordinator.url, state, data,
            conditions = { DeviceConditions(charging = eligible(), battery = 0.9, idle = true, unmetered = true) },
            config = ClientConfig(enrollmentToken = coordinator.enrollmentToken, seed = 1, retry = RetryPolicy(maxAttempts = 1)),
        )
    }

    @After
    fun stop() = coordinator.close()

    @Test
    fun anIneligibleDeviceDoesNotTouchTheNetwork() {
        val outcome = client { false }.runOnce()
        assertEquals(Outcome.INELIGIBLE, outcome.action)
        assertEquals(listOf("not charging"), outcome.reasons)
        assertEquals(0, coordinator.checkins)
        assertTrue(outcome.nextRunInS in 300.0..330.0)
    }

    @Test
    fun aLostAnswerIsLearntByResendingTheSameBytesAndKeyBeforeTheNextCheckIn() {
        coordinator.dropUploads = 1
        val c = client()
        val first = c.runOnce()
        assertEquals(Outcome.FAILED, first.action) // the answer never came
        assertEquals(1, coordinator.uploads.size)
        val residualFile = File(state, "residuals/t-1.f32frame")
        assertTrue(!residualFile.exists()) // the residual waits for the acknowledgement
        assertNotNull(c.state.loadPending())

        val checkinsBefore = coordinator.checkins
        val second = client().runOnce() // a new process, same state directory
        val (h1, f1) = coordinator.uploads[0]
        val (h2, f2) = coordinator.uploads[1]
        assertArrayEquals(f1, f2)
        assertEquals(h1.getValue("idempotency-key"), h2.getValue("idempotency-key"))
        assertEquals(checkinsBefore + 1, coordinator.checkins) // resent first, then checked in
        assertNull(c.state.loadPending())
        assertEquals(Outcome.TRAINED, second.action) // and the new pass trained again
        assertEquals(3, coordinator.uploads.size)
        // each acknowledged upload left its encoding's remainder as the residual (fp32 values:
        // zero where sent, the rest elsewhere)
        val residual = Updates.decode(residualFile.readBytes())
        val sent = Updates.decode(coordinator.uploads[2].second)
        assertEquals(sent.size, residual.size)
        assertTrue(residual.any { it != 0f })
        for (i in sent.indices) assertTrue(sent[i] == 0f || residual[i] == 0f)
        assertEquals("d-1", c.state.loadCredentials(coordinator.url)!!.deviceId)
    }

    @Test
    fun aRedirectedUploadIsNotTakenForAnAcknowledgement() {
        coordinator.script = { path -> if (path.endsWith("/update")) Triple(307, mapOf("Location" to "http://elsewhere.example/up"), ByteArray(0)) else null }
        val c = client()
        val outcome = c.runOnce()
        assertEquals(Outcome.FAILED, outcome.action)
        assertTrue(outcome.error!!, outcome.error!!.contains("307"))
        assertNotNull(c.state.loadPending()) // resent at the next pass
        assertTrue(!File(state, "residuals/t-1.f32frame").exists()) // the residual did not move on
        assertEquals(1, coordinator.uploads.size)
    }

    @Test
    fun aRateLimitingProxy429KeepsTheUploadForLater() {
        // RFC 6585: nothing was done; not the coordinator refusing the update
        val limited = Triple(429, mapOf("Retry-After" to "120"), "<html>Too Many Requests</html>".toByteArray())
        coordinator.script = { path -> if (path.endsWith("/update")) limited else null }
        val c = client()
        val first = c.runOnce()
        val pending = c.state.loadPending()
        assertEquals(Outcome.FAILED, first.action)
        assertNotNull(pending)
        assertTrue(coordinator.aborts.isEmpty())
        coordinator.script = { null }
        client().runOnce()
        assertArrayEquals(pending!!.frame, coordinator.uploads[1].second)
        assertEquals(pending.key, coordinator.uploads[1].first.getValue("idempotency-key"))
    }

    @Test
    fun aRefusedUploadAbortsItsAssignmentButAClosedRoundDoesNot() {
        // As the Python client: the coordinator's refusal (422 bad update) frees the slot at
        // once with an abort (phase upload, code refused); a 409's round is closed already.
        for ((status, code) in listOf(422 to "bad_update", 409 to "round_closed")) {
            coordinator.aborts.clear()
            val refusal = JSONObject().put("error", JSONObject().put("code", code).put("message", "no")).toString().toByteArray()
            coordinator.script = { path -> if (path.endsWith("/update")) Triple(status, emptyMap(), refusal) else null }
            val outcome = client().runOnce()
            assertEquals(Outcome.REJECTED, outcome.action)
            assertNull(client().state.loadPending())
            if (status == 422) {
                assertEquals(1, coordinator.aborts.size)
                val abort = coordinator.aborts.single()
                assertEquals("upload", abort.getString("phase"))
                assertEquals("refused", abort.getString("code"))
            } else {
                assertTrue(coordinator.aborts.isEmpty())
            }
        }
    }

    @Test
    fun a401ThatIsNotTheCoordinatorsKeepsTheDeviceIdentity() {
        // a gateway's 401 page, not the coordinator's `unauthorized`: the credential stays, no new registration
        coordinator.script = { path -> if (path == "/v1/checkin") Triple(401, emptyMap(), "<html>401</html>".toByteArray()) else null }
        val c = client()
        assertEquals(Outcome.FAILED, c.runOnce().action)
        assertEquals(1, coordinator.paths.count { it == "/v1/devices" })
        coordinator.script = { null }
        assertEquals(Outcome.TRAINED, c.runOnce().action)
        assertEquals(1, coordinator.paths.count { it == "/v1/devices" })
        assertEquals("d-1", c.state.loadCredentials(coordinator.url)!!.deviceId)
    }

    @Test
    fun anAnswerTooDeeplyNestedIsAFailedPassNotACrash() {
        // org.json recurses per level: 200,000 levels overflow the stack (an Error, which would end
        // the app's process); as an answer or as an error body it is one failed pass
        val deep = ("{\"action\": \"wait\", \"reason\": " + "[".repeat(200_000) + "]".repeat(200_000) + "}").toByteArray()
        for (status in listOf(200, 400)) {
            coordinator.script = { path -> if (path == "/v1/checkin") Triple(status, emptyMap(), deep) else null }
            assertEquals(Outcome.FAILED, client().runOnce().action)
        }
    }

    @Test
    fun anOverloadedCoordinatorIsNotAskedAgainBeforeItsRetryAfter() {
        val busy = JSONObject().put("error", JSONObject().put("code", "overloaded").put("message", "queue full")).toString().toByteArray()
        for ((status, body) in listOf(503 to busy, 429 to ByteArray(0))) {
            coordinator.script = { path -> if (path == "/v1/checkin") Triple(status, mapOf("Retry-After" to "600"), body) else null }
            val outcome = client().runOnce()
            assertEquals(Outcome.FAILED, outcome.action)
            assertTrue("$status: ${outcome.nextRunInS}", outcome.nextRunInS in 600.0..660.0)
        }
    }

    @Test
    fun anAssignmentIdThatCannotBeAUrlPathIsRefusedBeforeTraining() {
        val odd = coordinator.trainAnswer("a 1").toString().toByteArray()
        coordinator.script = { path -> if (path == "/v1/checkin") Triple(200, emptyMap(), odd) else null }
        val c = client()
        val outcome = c.runOnce()
        assertEquals(Outcome.FAILED, outcome.action)
        assertTrue(coordinator.paths.toString(), coordinator.paths.none { it.contains("/params") || it.contains("/assignments/") })
        assertNull(c.state.loadPending())
        coordinator.script = { null }
        assertEquals(Outcome.TRAINED, c.runOnce().action) // nothing left behind blocks the next pass
    }

    @Test
    fun aCredentialThatCannotBeSentInAHeaderIsNotKept() {
        val bad = JSONObject().put("device_id", "d-1").put("secret", "s3\ncret").toString().toByteArray()
        coordinator.script = { path -> if (path == "/v1/devices") Triple(201, emptyMap(), bad) else null }
        val c = client()
        assertEquals(Outcome.FAILED, c.runOnce().action)
        assertNull(c.state.loadCredentials(coordinator.url))
        coordinator.script = { null }
        assertEquals(Outcome.TRAINED, c.runOnce().action) // registered again
    }

    @Test
    fun anAbsurdWaitFromTheCoordinatorIsCappedAtADay() {
        // 1e10 s: a wrong unit or a broken coordinator; the device would be lost to the fleet
        coordinator.script = { path -> if (path == "/v1/checkin") Triple(200, emptyMap(), """{"action": "wait", "retry_after_s": 1e10}""".toByteArray()) else null }
        val waited = client().runOnce()
        assertEquals(Outcome.WAIT, waited.action)
        assertTrue("${waited.nextRunInS}", waited.nextRunInS in 86400.0..86400.0 * 1.1)
        val paced = """{"accepted": true, "round": 1, "model_version": 0, "retry_after_s": 1e10}""".toByteArray()
        coordinator.script = { path -> if (path.endsWith("/update")) Triple(200, emptyMap(), paced) else null }
        val trained = client().runOnce()
        assertEquals(Outcome.TRAINED, trained.action)
        assertTrue("${trained.nextRunInS}", trained.nextRunInS in 86400.0..86400.0 * 1.1)
    }

    @Test
    fun aNegativeWaitFailsThePass() {
        // else the device would check in again at once, pass after pass
        coordinator.script = { path -> if (path == "/v1/checkin") Triple(200, emptyMap(), """{"action": "wait", "retry_after_s": -30}""".toByteArray()) else null }
        assertEquals(Outcome.FAILED, client().runOnce().action)
    }

    @Test
    fun theFailureBackoffStaysWithinItsBoundsHoweverLongTheOutage() {
        val port = java.net.ServerSocket(0).use { it.localPort } // nobody listens there
        val c = Client(
            "http://127.0.0.1:$port", state, ArrayDataset.classification(FloatArray(64), 64, LongArray(1)),
            conditions = { DeviceConditions(charging = true, battery = 0.9, idle = true, unmetered = true) },
            config = ClientConfig(seed = 1, retry = RetryPolicy(maxAttempts = 1), failureBackoffS = 0.0),
        )
        val outcomes = List(1100) { c.runOnce() }
        assertTrue(outcomes.all { it.action == Outcome.FAILED })
        assertEquals(0.0, outcomes.last().nextRunInS, 0.0)
    }

    @Test
    fun savedLocalLayersAreDurableOnceSaveReturns() {
        // FedBN's own layers live in the state directory too: their rename is made durable
        val synced = Collections.synchronizedList(ArrayList<File>())
        val file = File(state, "local_layers/t-1.f32frame")
        Durable.onDirectorySynced = { dir -> synced.add(dir) }
        try {
            LocalLayers(file).save(floatArrayOf(1f, 2f, 3f))
        } finally {
            Durable.onDirectorySynced = null
        }
        assertEquals(listOf(file.parentFile), synced)
        assertArrayEquals(floatArrayOf(1f, 2f, 3f), LocalLayers(file).load(3), 0f)
    }

    @Test
    fun everyStepIsOnDiskBeforeTheNextOneCountsOnIt() {
        // A rename is durable only once its directory is fsync'ed: the credential and the pending
        // upload before save returns (the upload is sent next), the task's new residual before
        // the pending upload goes (else the old residual would be sent again).
        val synced = Collections.synchronizedList(ArrayList<String>())
        val s = DeviceState(state)
        Durable.onDirectorySynced = { dir ->
            synced.add(dir.relativeTo(state).path.ifEmpty { "." } + if (File(state, "pending/meta.json").exists()) " (pending)" else "")
        }
        try {
            s.saveCredentials(Credentials("http://127.0.0.1:1", "d-1", "s"))
            assertEquals(listOf("."), synced)
            synced.clear()
            val p = PendingUpload("http://127.0.0.1:1", "d-1", "a-1", "t-1", 1, "k", JSONObject(), byteArrayOf(1, 2), floatArrayOf(1f, 2f))
            s.savePending(p)
            assertEquals(". (pending)", synced.last()) // the state directory, after pending/ was renamed into it
            synced.clear()
            s.commitPending(p)
            assertTrue(synced.toString(), "residuals (pending)" in synced)
            assertNull(s.loadPending())
        } finally {
            Durable.onDirectorySynced = null
        }
    }
}
