/**
 * The wire protocol as docs/protocol.md describes it: routes, headers, error codes, the
 * errors a call ends with, and the HTTP transport ([Transport]) on HttpURLConnection.
 */
package dev.fedge.android.protocol

/** Route templates and headers of protocol version 1 (edge_sdk/protocol.py). */
object Protocol {
    const val API_PREFIX = "/v1"
    const val FRAME_CONTENT_TYPE = "application/x-fedge-frame"
    const val HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
    const val HEADER_REPORT = "X-Fedge-Report"
    const val HEADER_ENROLLMENT = "X-Fedge-Enrollment"

    /**
     * The ids a device sends back in URL paths or headers, or keeps as file names (edge_sdk's
     * SAFE_ID): the coordinator's are "a-"/"d-"/"t-" and hex. Anything else could not be sent,
     * would address another route, or (a ":") would split the Authorization header elsewhere.
     */
    @JvmField
    val SAFE_ID = Regex("^[A-Za-z0-9._-]{1,128}$")

    const val REGISTER = "/v1/devices"
    const val CHECKIN = "/v1/checkin"

    fun bundleManifest(bundleId: String) = "/v1/bundles/$bundleId"

    /**
     * A manifest may name a file with a space, a non-ASCII letter, "?" or "%": percent-encoded,
     * or it would not go into a request line or would be read as another path or a query (the
     * coordinator's router decodes it back).
     */
    fun bundleFile(bundleId: String, name: String) = "/v1/bundles/$bundleId/files/${quotePath(name)}"

    fun assignmentUpdate(id: String) = "/v1/assignments/$id/update"

    fun assignmentMetrics(id: String) = "/v1/assignments/$id/metrics"

    fun assignmentAbort(id: String) = "/v1/assignments/$id/abort"

    fun deviceAuthorization(deviceId: String, secret: String) = "Device $deviceId:$secret"

    /** [s] percent-encoded as UTF-8 for a URL path, "/" kept: Python's `urllib.parse.quote(s, safe="/")`. */
    fun quotePath(s: String): String {
        val out = StringBuilder()
        for (b in s.toByteArray(Charsets.UTF_8)) {
            val c = b.toInt() and 0xff
            if (c < 0x80 && (c.toChar().isLetterOrDigit() || c.toChar() in "-._~/")) out.append(c.toChar()) else out.append("%%%02X".format(c))
        }
        return out.toString()
    }

    /**
     * The JSON value in an answer's [text]. org.json parses nesting by recursion: an answer
     * nested a few thousand levels deep overflows the thread's stack, an Error that no caller of
     * an answer catches and that would end the app's process. It is a JSONException here, like
     * any other answer that is not what the protocol promises.
     */
    @JvmStatic
    fun parseJson(text: String): Any? = notTooDeep { org.json.JSONTokener(text).nextValue() }

    /** The JSON object in an answer's [text] (see [parseJson]). */
    @JvmStatic
    fun parseObject(text: String): org.json.JSONObject = notTooDeep { org.json.JSONObject(text) }

    private inline fun <T> notTooDeep(parse: () -> T): T = try {
        parse()
    } catch (_: StackOverflowError) {
        throw org.json.JSONException("JSON nested too deeply")
    }
}

/** Stable machine codes of error bodies (edge_sdk.protocol.ErrorCode). */
object ErrorCode {
    const val INVALID_REQUEST = "invalid_request"
    const val UNAUTHORIZED = "unauthorized"
    const val FORBIDDEN = "forbidden"
    const val NOT_FOUND = "not_found"
    const val MALFORMED_FRAME = "malformed_frame"
    const val BAD_UPDATE = "bad_update"
    const val ROUND_CLOSED = "round_closed"
    const val DUPLICATE_UPLOAD = "duplicate_upload"
    const val TOO_STALE = "too_stale"
    const val CONFLICT = "conflict"
    const val OVERLOADED = "overloaded"
}

/**
 * Why a call to the coordinator failed:
 *
 *     FedgeException
 *     ├── ApiException        the coordinator answered 4xx/5xx with an error code
 *     ├── TransportException  no usable answer after the retries (network, bad body)
 *     ├── CacheException      a bundle that does not match its manifest or id
 *     └── ConditionsLapsed    the device stopped being eligible during training
 */
open class FedgeException(message: String, cause: Throwable? = null) : Exception(message, cause)

class ApiException(
    val status: Int,
    val code: String?,
    message: String,
    /** Which request of the retried call got this answer (1-based). */
    val attempt: Int = 1,
    /** The answer's `Retry-After` in seconds (finite, not negative), or null. */
    val retryAfterS: Double? = null,
) : FedgeException("$status ${code ?: "?"}: $message") {
    /**
     * Whether the request was not acted on and may succeed when sent again: a 5xx, or a 429
     * (RFC 6585: a rate limiter, such as a load balancer's in front of the coordinator, did
     * nothing with it). Such an answer is retried, and refuses nothing: an upload it ends stays
     * pending.
     */
    val transient: Boolean get() = status >= 500 || status == 429

    /** 503 overloaded (the coordinator's work queue is full) or a rate limiter's 429: come back after [retryAfterS]. */
    val overloaded: Boolean get() = status == 429 || (status >= 500 && code == ErrorCode.OVERLOADED)
}

class TransportException(message: String, cause: Throwable? = null) : FedgeException(message, cause)

class CacheException(message: String) : FedgeException(message)

class ConditionsLapsed(val reasons: List<String>, val step: Int) :
    FedgeException("conditions lapsed at step $step: ${reasons.joinToString()}")
