package dev.fedge.android.protocol

import com.sun.net.httpserver.HttpServer
import org.json.JSONObject
import org.junit.After
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.net.InetSocketAddress
import java.nio.file.Files
import java.time.ZoneOffset
import java.time.ZonedDateTime
import java.time.format.DateTimeFormatter
import java.util.Collections
import java.util.Random

/** The transport against a real HTTP server on loopback: retries, error mapping, resumable downloads. */
class TransportTest {
    private val server = HttpServer.create(InetSocketAddress("127.0.0.1", 0), 0)
    private val seen: MutableList<Pair<Map<String, String>, ByteArray>> = Collections.synchronizedList(ArrayList())
    private val sleeps = ArrayList<Double>()
    private val url get() = "http://127.0.0.1:${server.address.port}"

    private fun transport(attempts: Int = 4) =
        Transport(url, RetryPolicy(maxAttempts = attempts, baseDelayS = 0.5, maxDelayS = 30.0, jitter = 0.5), 5_000, Random(1)) { sleeps.add(it) }

    /** Answers the n-th request (0-based) with answers[min(n, last)]: (status, headers, body). */
    private fun script(vararg answers: Triple<Int, Map<String, String>, ByteArray>) {
        server.createContext("/") { ex ->
            val headers = ex.requestHeaders.mapValues { it.value.first() }.mapKeys { it.key.lowercase() }
            seen.add(Pair(headers, ex.requestBody.readBytes()))
            val (status, extra, body) = answers[minOf(seen.size - 1, answers.size - 1)]
            for ((k, v) in extra) ex.responseHeaders.add(k, v)
            ex.sendResponseHeaders(status, if (body.isEmpty()) -1 else body.size.toLong())
            ex.responseBody.use { it.write(body) }
        }
        server.start()
    }

    private fun error(code: String) = JSONObject().put("error", JSONObject().put("code", code).put("message", "m")).toString().toByteArray()

    @After
    fun stop() = server.stop(0)

    @Test
    fun serverErrorsAreRetriedWithTheSameBytesThenTheAnswerReturned() {
        script(
            Triple(500, emptyMap(), error("internal")),
            Triple(503, mapOf("Retry-After" to "4"), error("overloaded")),
            Triple(200, emptyMap(), """{"accepted": true}""".toByteArray()),
        )
        val t = transport()
        t.credentials = Pair("d-1", "s")
        val body = byteArrayOf(1, 2, 3, 4, 5)
        val r = t.request("POST", "/v1/assignments/a/update", body, mapOf("Idempotency-Key" to "k1"))
        assertEquals(200, r.status)
        assertEquals(3, seen.size)
        for ((headers, sent) in seen) {
            assertArrayEquals(body, sent)
            assertEquals("k1", headers["idempotency-key"])
            assertEquals("Device d-1:s", headers["authorization"])
        }
        assertEquals(2, sleeps.size)
        assertTrue(sleeps[0] in 0.25..0.5) // backoff 0.5 s with up to 50 % jitter
        assertTrue(sleeps[1] in 4.0..6.0) // Retry-After 4 s times U[1, 1.5]
    }

    @Test
    fun aClientErrorIsNotRetriedAndCarriesItsCode() {
        script(Triple(409, emptyMap(), error("round_closed")))
        try {
            transport().call("POST", "/v1/checkin", JSONObject())
            fail("409 accepted")
        } catch (e: ApiException) {
            assertEquals(409, e.status)
            assertEquals(ErrorCode.ROUND_CLOSED, e.code)
            assertEquals(1, e.attempt)
        }
        assertEquals(1, seen.size)
        assertTrue(sleeps.isEmpty())
    }

    @Test
    fun afterTheLastAttemptAServerErrorIsRaised() {
        script(Triple(502, emptyMap(), "bad gateway".toByteArray()))
        try {
            transport(attempts = 3).request("GET", "/v1/health")
            fail("502 accepted")
        } catch (e: ApiException) {
            assertEquals(502, e.status)
            assertEquals(null, e.code) // not a JSON error body
            assertEquals(3, e.attempt)
        }
        assertEquals(3, seen.size)
    }

    @Test
    fun aConnectionThatFailsIsRetriedThenReported() {
        val dead = HttpServer.create(InetSocketAddress("127.0.0.1", 0), 0)
        val port = dead.address.port
        dead.stop(0) // nothing listens there now
        server.start()
        val t = Transport("http://127.0.0.1:$port", RetryPolicy(maxAttempts = 3, baseDelayS = 0.01), 2_000, Random(1)) { sleeps.add(it) }
        try {
            t.call("POST", "/v1/checkin", JSONObject())
            fail("no server, yet an answer")
        } catch (e: TransportException) {
            assertTrue(e.message!!.contains("after 3 attempts"))
        }
        assertEquals(2, sleeps.size)
    }

    @Test
    fun aDownloadResumesFromThePartialFileWithRange() {
        val content = ByteArray(1000) { (it * 7).toByte() }
        script(Triple(206, mapOf("Content-Range" to "bytes 400-999/1000"), content.copyOfRange(400, 1000)))
        val file = File(Files.createTempDirectory("dl").toFile(), "part")
        file.writeBytes(content.copyOf(400))
        transport().download("/v1/bundles/x/files/step.onnx", file, 1000)
        assertEquals("bytes=400-", seen.single().first["range"])
        assertArrayEquals(content, file.readBytes())
    }

    @Test
    fun aRangeAnsweredFromElsewhereIsNotAppended() {
        val content = ByteArray(100) { it.toByte() }
        script(
            Triple(206, mapOf("Content-Range" to "bytes 0-99/100"), content),
            Triple(200, emptyMap(), content),
        )
        val file = File(Files.createTempDirectory("dl").toFile(), "part")
        file.writeBytes(content.copyOf(30))
        transport().download("/f", file, 100)
        // the misplaced 206 was refused (a connection-level failure, retried); the 200 restarted the file
        assertEquals(2, seen.size)
        assertArrayEquals(content, file.readBytes())
    }

    @Test
    fun aRedirectIsNeitherTakenForAnAnswerNorFollowed() {
        // a proxy's or a captive portal's, not the coordinator's: following it would send the credential elsewhere
        script(Triple(307, mapOf("Location" to "$url/elsewhere"), ByteArray(0)))
        try {
            transport().request("POST", "/v1/assignments/a/update", byteArrayOf(1, 2, 3))
            fail("307 accepted")
        } catch (e: TransportException) {
            assertTrue(e.message!!, e.message!!.contains("307"))
        }
        assertEquals(1, seen.size)
        assertTrue(sleeps.isEmpty())
    }

    @Test
    fun aDownloadStartsOverWhenA206ResumesFromElsewhere() {
        // protocol.md: append only when the 206 starts at the size held; anything else starts the file over
        val content = ByteArray(100) { it.toByte() }
        val ranges = Collections.synchronizedList(ArrayList<String?>())
        server.createContext("/") { ex ->
            val range = ex.requestHeaders.getFirst("Range")
            ranges.add(range)
            if (range != null) ex.responseHeaders.add("Content-Range", "bytes 0-99/100")
            ex.sendResponseHeaders(if (range != null) 206 else 200, content.size.toLong())
            ex.responseBody.use { it.write(content) }
        }
        server.start()
        val file = File(Files.createTempDirectory("dl").toFile(), "part")
        file.writeBytes(content.copyOf(30))
        transport().download("/f", file, 100)
        assertArrayEquals(content, file.readBytes())
        assertEquals(listOf("bytes=30-", null), ranges)
    }

    @Test
    fun aRateLimiters429IsRetriedAfterItsRetryAfter() {
        script(
            Triple(429, mapOf("Retry-After" to "4"), "<html>Too Many Requests</html>".toByteArray()),
            Triple(200, emptyMap(), """{"ok": true}""".toByteArray()),
        )
        assertEquals(true, transport().call("POST", "/v1/checkin", JSONObject())!!.getBoolean("ok"))
        assertEquals(2, seen.size)
        assertTrue(sleeps.toString(), sleeps.single() in 4.0..6.0)
    }

    @Test
    fun aRetryAfterGivenAsAnHttpDateIsHonoured() {
        // RFC 9110 lets Retry-After be a date (proxies and load balancers send one): the wait is
        // that date less the answer's Date (one-second resolution on both: 9 to 11 s), times
        // U[1, 1.5]; a date already past is no wait beyond the backoff
        val ahead = DateTimeFormatter.RFC_1123_DATE_TIME.format(ZonedDateTime.now(ZoneOffset.UTC).plusSeconds(10))
        script(
            Triple(503, mapOf("Retry-After" to ahead), error("overloaded")),
            Triple(503, mapOf("Retry-After" to "Wed, 21 Oct 2015 07:28:00 GMT"), error("overloaded")),
            Triple(200, emptyMap(), """{"ok": true}""".toByteArray()),
        )
        assertEquals(true, transport().call("POST", "/v1/checkin", JSONObject())!!.getBoolean("ok"))
        assertEquals(2, sleeps.size)
        assertTrue(sleeps.toString(), sleeps[0] in 9.0..16.5)
        assertTrue(sleeps.toString(), sleeps[1] in 0.5..1.0) // attempt 2's backoff: 1 s, jittered
    }

    @Test
    fun anAnswerCutShortOfItsContentLengthIsRetried() {
        // a coordinator restarting mid-answer: the bytes that came are no answer (a frame or JSON
        // cut short), the request is sent again
        val full = """{"action": "wait", "retry_after_s": 5.0, "reason": "no_task"}""".toByteArray()
        server.createContext("/") { ex ->
            seen.add(Pair(emptyMap(), ex.requestBody.readBytes()))
            ex.sendResponseHeaders(200, full.size.toLong())
            if (seen.size == 1) {
                ex.responseBody.write(full, 0, 20)
                ex.responseBody.flush()
                ex.close() // fewer bytes than announced: the connection is dropped
            } else {
                ex.responseBody.use { it.write(full) }
            }
        }
        server.start()
        val r = transport().request("GET", "/v1/tasks/t/versions/0/params")
        assertArrayEquals(full, r.body)
        assertEquals(2, seen.size)
        assertEquals(1, sleeps.size)
    }

    @Test
    fun aRetryAfterPastTheLongestWaitIsStillSpreadByJitter() {
        // asked for more than maxDelayS (30 s): each device waits 30 s times U[1, 1.5], not all exactly 30 s
        script(
            Triple(503, mapOf("Retry-After" to "999"), error("overloaded")),
            Triple(503, mapOf("Retry-After" to "999"), error("overloaded")),
            Triple(200, emptyMap(), """{"ok": true}""".toByteArray()),
        )
        transport().call("POST", "/v1/checkin", JSONObject())
        assertEquals(2, sleeps.size)
        assertTrue(sleeps.toString(), sleeps.all { it in 30.0..45.0 })
        assertTrue(sleeps.toString(), sleeps[0] != sleeps[1])
    }

    @Test
    fun aLongRetryPolicyKeepsItsBackoffWithinItsBounds() {
        // past 1024 doublings 2^n is infinite, and 0 (retry at once) times infinity is NaN
        val rng = Random(0)
        assertEquals(0.0, RetryPolicy(maxAttempts = 5000, baseDelayS = 0.0).delay(2000, rng), 0.0)
        assertTrue(RetryPolicy(maxAttempts = 5000).delay(2000, rng) in 15.0..30.0)
    }
}
