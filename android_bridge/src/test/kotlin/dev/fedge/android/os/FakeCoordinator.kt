package dev.fedge.android.os

import com.sun.net.httpserver.HttpExchange
import com.sun.net.httpserver.HttpServer
import dev.fedge.android.frame.Frame
import org.json.JSONObject
import java.io.File
import java.net.InetSocketAddress
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.Collections

/**
 * A scripted coordinator on loopback for the Android layer's tests, which are about what the
 * job does around a pass (stop, abort, reschedule), not about the coordinator: it registers one
 * device (enrollment token required), hands out one training assignment on [bundle], serves the
 * bundle (with Range) and the parameters, and records aborts and uploads. The real coordinator
 * is exercised end to end by tests/android_bridge (Python).
 */
class FakeCoordinator(private val bundle: File, private val plan: JSONObject) : AutoCloseable {
    val enrollmentToken = "enroll-me"
    val aborts: MutableList<JSONObject> = Collections.synchronizedList(ArrayList())
    val uploads: MutableList<Pair<Map<String, String>, ByteArray>> = Collections.synchronizedList(ArrayList())
    /** Uploads to receive and then drop the connection on, without an answer (a lost answer). */
    @Volatile
    var dropUploads = 0
    /** Every request's path, in order. */
    val paths: MutableList<String> = Collections.synchronizedList(ArrayList())
    /**
     * Scripted answers ahead of the defaults: for a request's path, a reply (status, headers,
     * body), or null for the default answer. Uploads are recorded before it is asked.
     */
    @Volatile
    var script: (String) -> Triple<Int, Map<String, String>, ByteArray>? = { null }
    /** Check-ins answered so far. */
    @Volatile
    var checkins = 0
    private val manifest = JSONObject(File(bundle, "manifest.json").readText())
    private val bundleId = manifest.getString("bundle_id")
    private val server = HttpServer.create(InetSocketAddress("127.0.0.1", 0), 0)

    val url: String get() = "http://127.0.0.1:${server.address.port}"

    init {
        server.createContext("/") { ex ->
            try {
                handle(ex)
            } catch (e: Exception) {
                send(ex, 500, JSONObject().put("error", JSONObject().put("code", "internal").put("message", "$e")))
            }
        }
        server.start()
    }

    private fun handle(ex: HttpExchange) {
        val path = ex.requestURI.path
        val body = ex.requestBody.readBytes()
        paths.add(path)
        if (path.startsWith("/v1/assignments/") && path.endsWith("/update")) {
            uploads.add(Pair(ex.requestHeaders.mapValues { it.value.first() }.mapKeys { it.key.lowercase() }, body))
        }
        script(path)?.let { (status, headers, data) ->
            for ((k, v) in headers) ex.responseHeaders.add(k, v)
            return sendBytes(ex, status, data)
        }
        if (path == "/v1/devices") {
            if (ex.requestHeaders.getFirst("X-Fedge-Enrollment") != enrollmentToken) return error(ex, 401, "unauthorized")
            return send(ex, 201, JSONObject().put("device_id", "d-1").put("secret", "s3cret"))
        }
        if (ex.requestHeaders.getFirst("Authorization") != "Device d-1:s3cret") return error(ex, 401, "unauthorized")
        when {
            path == "/v1/checkin" -> checkins++.let { _ -> send(ex, 200, trainAnswer()) }
            path == "/v1/bundles/$bundleId" -> sendBytes(ex, 200, File(bundle, "manifest.json").readBytes())
            path.startsWith("/v1/bundles/$bundleId/files/") -> {
                val data = File(bundle, path.substringAfterLast('/')).readBytes()
                val from = ex.requestHeaders.getFirst("Range")?.removePrefix("bytes=")?.removeSuffix("-")?.toInt() ?: 0
                if (from > 0) ex.responseHeaders.add("Content-Range", "bytes $from-${data.size - 1}/${data.size}")
                sendBytes(ex, if (from > 0) 206 else 200, data.copyOfRange(from, data.size))
            }
            path == "/v1/tasks/t-1/versions/0/params" -> {
                val raw = ByteBuffer.wrap(File(bundle, "params.f32").readBytes()).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
                sendBytes(ex, 200, Frame.encodeFloats(FloatArray(raw.remaining()).also { raw.get(it) }))
            }
            path == "/v1/assignments/a-1/abort" -> {
                aborts.add(JSONObject(String(body)))
                send(ex, 200, JSONObject().put("aborted", true).put("retry_after_s", 42.0))
            }
            path == "/v1/assignments/a-1/update" -> {
                if (dropUploads > 0) {
                    dropUploads--
                    ex.close() // counted, but the answer never reaches the device
                    return
                }
                send(ex, 200, JSONObject().put("accepted", true).put("round", 1).put("model_version", 0).put("retry_after_s", 17.0))
            }
            else -> error(ex, 404, "not_found")
        }
    }

    /** The check-in answer handing out training assignment [assignmentId] on the bundle. */
    fun trainAnswer(assignmentId: String = "a-1"): JSONObject = JSONObject().put("action", "train").put(
        "assignment",
        JSONObject().put("assignment_id", assignmentId).put("task_id", "t-1").put("round", 1).put("model_version", 0)
            .put("bundle_id", bundleId).put("params_url", "/v1/tasks/t-1/versions/0/params")
            .put("deadline_in_s", 60.0).put("plan", plan),
    )

    private fun error(ex: HttpExchange, status: Int, code: String) =
        send(ex, status, JSONObject().put("error", JSONObject().put("code", code).put("message", code)))

    private fun send(ex: HttpExchange, status: Int, body: JSONObject) {
        ex.responseHeaders.add("Content-Type", "application/json")
        sendBytes(ex, status, body.toString().toByteArray())
    }

    private fun sendBytes(ex: HttpExchange, status: Int, data: ByteArray) {
        ex.sendResponseHeaders(status, if (data.isEmpty()) -1 else data.size.toLong())
        ex.responseBody.use { it.write(data) }
    }

    override fun close() = server.stop(0)
}
