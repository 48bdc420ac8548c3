package dev.fedge.android.protocol

import org.json.JSONObject
import java.io.ByteArrayOutputStream
import java.io.File
import java.io.FileOutputStream
import java.io.IOException
import java.io.InputStream
import java.net.HttpURLConnection
import java.net.URL
import java.time.ZonedDateTime
import java.time.format.DateTimeFormatter
import java.time.format.DateTimeParseException
import javax.net.ssl.HttpsURLConnection
import java.util.Random

/**
 * Exponential backoff with jitter: after failed attempt `n` wait `base * 2^(n-1)` (capped)
 * times a factor in `[1 - jitter, 1]`, so that devices cut off together do not return together.
 */
data class RetryPolicy @JvmOverloads constructor(
    val maxAttempts: Int = 5,
    val baseDelayS: Double = 0.5,
    val maxDelayS: Double = 30.0,
    val jitter: Double = 0.5,
) {
    init {
        require(maxAttempts >= 1) { "maxAttempts must be at least 1" }
        require(jitter in 0.0..1.0) { "jitter must be in [0, 1]" }
    }

    fun delay(attempt: Int, rng: Random): Double =
        doublingBackoff(baseDelayS, attempt, maxDelayS) * (1.0 - jitter * rng.nextDouble())

    companion object {
        /**
         * The [n]-th wait (1-based) of a backoff that doubles from [firstS] up to [capS]. The
         * exponent is bounded first: 2^n is infinite past n = 1023 (a long retry policy, weeks of
         * failed passes), and a first wait of 0 times infinity is NaN; 2^64 times any sensible
         * first wait is far past any cap.
         */
        @JvmStatic
        fun doublingBackoff(firstS: Double, n: Int, capS: Double): Double =
            minOf(capS, firstS * Math.pow(2.0, minOf(n - 1, 64).toDouble()))
    }
}

/** A 2xx answer: status, lower-cased headers, body. */
class Response(val status: Int, val headers: Map<String, String>, val body: ByteArray)

/**
 * HTTP(S) to the coordinator on HttpURLConnection (Android has no java.net.http): JSON calls,
 * raw bodies (frame uploads), resumable downloads into a file; error bodies mapped to
 * [ApiException]; connection failures and 5xx (and a rate limiter's 429) retried with the same
 * bytes after a jittered backoff ([RetryPolicy]), never another 4xx (the same answer next
 * time); a 3xx is no answer at all ([TransportException], not followed); HTTPS with a custom
 * CA and public-key pinning ([TlsConfig]). Not thread-safe.
 */
class Transport @JvmOverloads constructor(
    baseUrl: String,
    private val retry: RetryPolicy = RetryPolicy(),
    private val timeoutMs: Int = 30_000,
    private val rng: Random = Random(),
    private val tls: TlsConfig? = null,
    private val sleeper: (Double) -> Unit = { s -> Thread.sleep((s * 1000).toLong()) },
) {
    val baseUrl: String = baseUrl.trimEnd('/')

    init {
        val u = URL(this.baseUrl)
        require(u.protocol == "http" || u.protocol == "https") { "coordinator URL must be http(s)://host[:port]" }
        // A CA or a pin on a plain-HTTP URL would protect nothing: say so rather than ignore it.
        require(tls == null || u.protocol == "https") { "TLS options need an https:// URL, got $baseUrl" }
    }

    /** `(device_id, secret)` sent as `Authorization: Device id:secret` on every call. */
    @Volatile
    var credentials: Pair<String, String>? = null

    var bytesSent = 0L
        private set
    var bytesReceived = 0L
        private set

    /** A JSON call ([payload] null: no body); the decoded answer object (or null if empty). */
    @JvmOverloads
    fun call(method: String, path: String, payload: JSONObject? = null, headers: Map<String, String> = emptyMap()): JSONObject? {
        val body = payload?.toString()?.toByteArray(Charsets.UTF_8) ?: ByteArray(0)
        val all = mapOf("Content-Type" to "application/json", "Accept" to "application/json") + headers
        val response = request(method, path, body, all)
        if (response.body.isEmpty()) return null
        val text = String(response.body, Charsets.UTF_8)
        return try {
            Protocol.parseJson(text) as? JSONObject ?: throw TransportException("$method $path: answer is not a JSON object")
        } catch (e: org.json.JSONException) {
            throw TransportException("$method $path: answer is not JSON: ${e.message}", e)
        }
    }

    /** Sends [body] (the same bytes on every retry); the 2xx answer, or throws. */
    @JvmOverloads
    fun request(method: String, path: String, body: ByteArray = ByteArray(0), headers: Map<String, String> = emptyMap()): Response =
        retrying(method, path) { exchange(method, path, body, headers, null, MAX_ANSWER) }

    /**
     * Streams `GET path` into [file], resuming from its size with `Range` on every attempt and
     * stopping after [limit] bytes. A server that ignores Range (200), or a 206 that does not
     * start at the file's size, makes the file start over.
     */
    fun download(path: String, file: File, limit: Long): Response =
        retrying("GET", path) {
            val offset = if (file.isFile) file.length() else 0L
            val headers = if (offset > 0) mapOf("Range" to "bytes=$offset-") else emptyMap()
            exchange("GET", path, ByteArray(0), headers, file, limit)
        }

    private class Failed(val io: IOException) : Exception(io)

    private fun retrying(method: String, path: String, attempt: () -> Response): Response {
        var n = 0
        while (true) {
            n++
            val response = try {
                attempt()
            } catch (f: Failed) {
                if (n >= retry.maxAttempts) throw TransportException("$method $path: ${f.io} after $n attempts", f.io)
                sleeper(retry.delay(n, rng))
                continue
            }
            if (response.status < 300) return response
            if (response.status < 400) {
                // Not the coordinator's answer (a proxy's, a captive portal's), and never followed:
                // the device's credential would go to whatever host it names. Taken for a 2xx, it
                // would settle an upload that was never counted.
                val location = response.headers["location"] ?: ""
                throw TransportException("$method $path: redirected (${response.status}) to '$location', not followed")
            }
            val error = error(response, n)
            if (error.transient && n < retry.maxAttempts) {
                // 503 overloaded, 429: nothing was done; come back after Retry-After (at most the
                // policy's longest wait) times U[1, 1.5] so that the refused devices do not return
                // together: the cap comes before the jitter, or every device asked for more than the
                // cap would come back at the same moment.
                val asked = minOf(retry.maxDelayS, error.retryAfterS ?: 0.0)
                sleeper(maxOf(retry.delay(n, rng), asked * (1.0 + 0.5 * rng.nextDouble())))
                continue
            }
            throw error
        }
    }

    private fun error(response: Response, attempt: Int): ApiException {
        var code: String? = null
        var message = String(response.body, 0, minOf(200, response.body.size), Charsets.UTF_8)
        try {
            val err = Protocol.parseObject(String(response.body, Charsets.UTF_8)).getJSONObject("error")
            code = err.getString("code")
            message = err.optString("message", "")
        } catch (_: org.json.JSONException) {
        }
        val retryAfter = retryAfterS(response.headers["retry-after"], response.headers["date"])
        return ApiException(response.status, code, message, attempt, retryAfter)
    }

    private fun exchange(
        method: String,
        path: String,
        body: ByteArray,
        headers: Map<String, String>,
        sink: File?,
        limit: Long,
    ): Response {
        val conn = try {
            URL(baseUrl + path).openConnection() as HttpURLConnection
        } catch (e: IOException) {
            throw Failed(e)
        }
        try {
            conn.requestMethod = method
            conn.connectTimeout = timeoutMs
            conn.readTimeout = timeoutMs
            conn.instanceFollowRedirects = false
            conn.useCaches = false
            conn.setRequestProperty("User-Agent", USER_AGENT)
            for ((k, v) in headers) conn.setRequestProperty(k, v)
            credentials?.let { (id, secret) -> conn.setRequestProperty("Authorization", Protocol.deviceAuthorization(id, secret)) }
            val sending = method == "POST" || method == "PUT"
            if (sending) {
                conn.doOutput = true
                conn.setFixedLengthStreamingMode(body.size)
            }
            if (conn is HttpsURLConnection && tls != null) {
                // Everything about the request is set before connect(); the request itself
                // (credential included) goes out only after the pin checked.
                tls.configure(conn)
                conn.connect()
                tls.checkPin(conn)
            }
            if (sending) {
                conn.outputStream.use { it.write(body) }
                bytesSent += body.size
            }
            val status = conn.responseCode
            val respHeaders = conn.headerFields.filterKeys { it != null }.mapKeys { it.key.lowercase() }.mapValues { it.value.firstOrNull() ?: "" }
            val stream: InputStream? = if (status >= 400) conn.errorStream else conn.inputStream
            if (sink != null && (status == 200 || status == 206)) {
                val append = status == 206
                if (append) checkRange(respHeaders, sink)
                val room = limit - (if (append) sink.length() else 0L)
                FileOutputStream(sink, append).use { out -> checkComplete(respHeaders, copy(stream!!, out, room), room) }
                return Response(status, respHeaders, ByteArray(0))
            }
            val held = ByteArrayOutputStream()
            if (stream != null) {
                stream.use { checkComplete(respHeaders, copy(it, held, limit), limit) }
            }
            return Response(status, respHeaders, held.toByteArray())
        } catch (e: IOException) {
            conn.disconnect()
            throw Failed(e)
        } catch (e: TlsException) {
            conn.disconnect()
            throw e // not the network's fault: a retry would meet the same key
        }
    }

    /** Copies at most [room] bytes (a longer body is cut there: the caller's hash check decides); the bytes copied. */
    private fun copy(input: InputStream, out: java.io.OutputStream, room: Long): Long {
        val chunk = ByteArray(64 * 1024)
        var left = room
        while (left > 0) {
            val k = input.read(chunk, 0, minOf(chunk.size.toLong(), left).toInt())
            if (k < 0) break
            out.write(chunk, 0, k)
            bytesReceived += k
            left -= k
        }
        return room - left
    }

    /**
     * The JVM's HttpURLConnection ends a body at the peer's close even before its Content-Length
     * (a coordinator restarting mid-answer): the bytes that came are then a connection failure,
     * retried (a download resumes from them), never an answer.
     */
    private fun checkComplete(headers: Map<String, String>, copied: Long, room: Long) {
        val announced = headers["content-length"]?.toLongOrNull() ?: return
        if (copied < minOf(announced, room)) throw IOException("answer cut short: $copied of $announced bytes")
    }

    private fun checkRange(headers: Map<String, String>, sink: File) {
        // "bytes START-END/TOTAL": a server resuming elsewhere would corrupt the file. Asking for
        // the same range again would get the same answer, so (protocol.md) the file starts over:
        // emptied here, the next attempt asks for all of it without Range.
        val offset = sink.length()
        val value = headers["content-range"] ?: ""
        val start = value.split(' ').getOrNull(1)?.substringBefore('-')?.toLongOrNull()
        if (start != offset) {
            FileOutputStream(sink).close()
            val got = if (start != null) "from $start" else "Content-Range '$value'"
            throw IOException("asked for bytes from $offset, got $got")
        }
    }

    private companion object {
        const val USER_AGENT = "fedge-android/1"
        const val MAX_ANSWER = 256L * 1024 * 1024

        /**
         * A `Retry-After` in seconds, given as seconds or (RFC 9110, a proxy's or a load
         * balancer's) as an HTTP-date; null without a usable one. A date is measured against the
         * answer's own `Date` when there is one: the phone's clock may be far off the server's,
         * and both dates are the server's. A date already past is no wait.
         */
        fun retryAfterS(value: String?, serverDate: String?): Double? {
            val v = value?.trim() ?: return null
            // Kotlin's toDouble reads "NaN" and "Infinity" too: neither is a wait.
            v.toDoubleOrNull()?.let { s -> return s.takeIf { it.isFinite() && it >= 0.0 } }
            val until = httpDate(v) ?: return null
            val now = serverDate?.let(::httpDate) ?: (System.currentTimeMillis() / 1000.0)
            return maxOf(0.0, until - now)
        }

        fun httpDate(value: String): Double? = try {
            ZonedDateTime.parse(value.trim(), DateTimeFormatter.RFC_1123_DATE_TIME).toEpochSecond().toDouble()
        } catch (_: DateTimeParseException) {
            null
        }
    }
}
