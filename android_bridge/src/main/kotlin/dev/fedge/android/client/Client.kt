package dev.fedge.android.client

import dev.fedge.android.codec.Updates
import dev.fedge.android.protocol.ApiException
import dev.fedge.android.protocol.ConditionsLapsed
import dev.fedge.android.protocol.ErrorCode
import dev.fedge.android.protocol.FedgeException
import dev.fedge.android.protocol.Protocol
import dev.fedge.android.protocol.RetryPolicy
import dev.fedge.android.protocol.TlsConfig
import dev.fedge.android.protocol.Transport
import dev.fedge.android.protocol.TransportException
import dev.fedge.android.trainer.Dataset
import dev.fedge.android.trainer.LocalTraining
import dev.fedge.android.trainer.OrtStepTrainer
import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.security.MessageDigest
import java.util.Random
import java.util.concurrent.atomic.AtomicBoolean
import java.util.logging.Level
import java.util.logging.Logger

/** Settings of a [Client]; every wait is in seconds. */
data class ClientConfig @JvmOverloads constructor(
    val population: String = "default",
    /** Sent as `X-Fedge-Enrollment` when registering; coordinators require it by default. */
    val enrollmentToken: String? = null,
    val ineligibleRecheckS: Double = 300.0,
    val afterAssignmentS: Double = 1.0,
    val failureBackoffS: Double = 30.0,
    val maxFailureBackoffS: Double = 3600.0,
    /** Fraction added on top of every wait (the protocol: up to 10 %), so devices spread out. */
    val checkinJitter: Double = 0.1,
    val requestTimeoutMs: Int = 30_000,
    val retry: RetryPolicy = RetryPolicy(),
    /** Shuffling, stochastic rounding and jitter; null: fresh entropy. */
    val seed: Long? = null,
    /** HTTPS with the coordinator's own CA and/or its public-key pin. */
    val tls: TlsConfig? = null,
)

/** What one [Client.runOnce] ended with, and when to run again ([nextRunInS], pace-steered). */
class Outcome(
    val action: String,
    val nextRunInS: Double,
    val assignmentId: String? = null,
    val taskId: String? = null,
    val round: Int? = null,
    val reasons: List<String> = emptyList(),
    /** The report that was sent (num_examples, loss, steps, ..., bytes_up). */
    val metrics: JSONObject = JSONObject(),
    val error: String? = null,
    /** The update frame that was uploaded, and the coordinator's answer to it. */
    val uploaded: ByteArray? = null,
    val answer: JSONObject? = null,
) {
    override fun toString() = "Outcome($action, next in ${"%.1f".format(nextRunInS)} s, ${reasons.joinToString()}${error?.let { ", $it" } ?: ""})"

    companion object {
        const val INELIGIBLE = "ineligible" // the local policy said no; no network at all
        const val WAIT = "wait" // the coordinator said come back later
        const val TRAINED = "trained" // the update was accepted
        const val EVALUATED = "evaluated" // evaluation metrics were accepted
        const val ABORTED = "aborted" // conditions lapsed or the job was stopped; the coordinator was told
        const val REJECTED = "rejected" // the coordinator refused the upload (late, stale, bad)
        const val FAILED = "failed" // network or local error; retried after a growing backoff (at least an overload's Retry-After)
    }
}

/**
 * A device's federated-learning client, speaking docs/protocol.md like edge_sdk.client.Client:
 *
 *     read conditions ──ineligible──▶ INELIGIBLE (no network)
 *     register once (credential in the state dir; enrollment token header)
 *     check in ──wait──▶ WAIT, next run after retry_after_s (at most a day) + up to 10 % jitter
 *     bundle (sha256-verified, resumable cache) + the version's parameters
 *     train the plan, re-checking conditions ──lapsed or stopped──▶ POST abort, ABORTED
 *     delta = new - start (clipped to dp.clip for a DP task), encode with the plan's codec
 *     (error-feedback residual kept)
 *     persist the upload (frame, key, new residual), send it with its Idempotency-Key,
 *     retried ──▶ TRAINED or REJECTED; an answer that never came is learnt by resending
 *     the same bytes and key at the start of the next pass
 *
 * [runOnce] never throws for network or coordinator trouble ([Outcome.FAILED]). [requestStop]
 * (from another thread, e.g. JobService.onStopJob) ends training before its next step and
 * aborts the assignment. One client per device; [runOnce] runs one pass at a time.
 */
class Client @JvmOverloads constructor(
    coordinator: String,
    stateDir: File,
    private val data: Dataset,
    private val conditions: ConditionsProvider,
    val policy: EligibilityPolicy = EligibilityPolicy(),
    private val evalData: Dataset = data,
    val config: ClientConfig = ClientConfig(),
    val cache: BundleCache = BundleCache(File(stateDir, "bundles")),
    private val clock: () -> Double = { System.nanoTime() / 1e9 },
) : AutoCloseable {
    val state = DeviceState(stateDir)
    private val rng: Random = config.seed?.let { Random(it) } ?: Random()
    val transport = Transport(coordinator, config.retry, config.requestTimeoutMs, rng, tls = config.tls)
    private val stop = AtomicBoolean(false)
    private var failures = 0
    private var trainer: OrtStepTrainer? = null
    private var phase = "download" // where the current assignment is, for an abort's `phase`

    val deviceId: String? get() = transport.credentials?.first

    /** Asks a pass in progress to stop before its next training step (and abort its assignment). */
    fun requestStop() = stop.set(true)

    val stopRequested: Boolean get() = stop.get()

    /** The reasons this device may not train now (empty: it may). */
    fun ineligibility(): List<String> = policy.check(conditions.read())

    @Synchronized
    fun runOnce(): Outcome {
        stop.set(false)
        val outcome = try {
            pass()
        } catch (e: FedgeException) {
            failed(e)
        } catch (e: org.json.JSONException) { // an answer without the fields the protocol promises
            failed(e)
        } catch (e: java.io.IOException) {
            failed(e)
        } catch (e: RuntimeException) { // a bad value in an answer, or a bug: never the job's end
            failed(e)
        }
        if (outcome.action != Outcome.FAILED) failures = 0
        return outcome
    }

    private fun jittered(seconds: Double) = maxOf(0.0, seconds) * (1.0 + config.checkinJitter * rng.nextDouble())

    /** The jittered wait an accepted report's answer asks for, else [default] (lenient: it was accepted). */
    private fun paced(answer: JSONObject?, default: Double): Double {
        val asked = answer?.opt("retry_after_s")
        return jittered(if (asked is Number && asked.toDouble().isFinite()) minOf(asked.toDouble(), MAX_ASKED_WAIT_S) else default)
    }

    private fun failed(e: Exception): Outcome {
        failures++
        var backoff = RetryPolicy.doublingBackoff(config.failureBackoffS, failures, config.maxFailureBackoffS)
        val asked = (e as? ApiException)?.takeIf { it.overloaded }?.retryAfterS
        if (asked != null) {
            // Pace steering: the coordinator (or its rate limiter) said when to come back, longer
            // than one request may wait (RetryPolicy.maxDelayS); sooner only adds to the load it sheds.
            backoff = maxOf(backoff, minOf(asked, config.maxFailureBackoffS))
        }
        val code = (e as? ApiException)?.code ?: "${e.javaClass.simpleName}: ${e.message}"
        log.log(Level.WARNING, "run failed: $code")
        return Outcome(Outcome.FAILED, jittered(backoff), error = code)
    }

    private fun pass(): Outcome {
        val now = conditions.read()
        val reasons = policy.check(now)
        if (reasons.isNotEmpty()) return Outcome(Outcome.INELIGIBLE, jittered(config.ineligibleRecheckS), reasons = reasons)
        ensureRegistered()
        resolvePending()
        val body = JSONObject()
            .put("population", config.population)
            .put("runtimes", JSONArray(RUNTIMES))
            .put("conditions", now.toJson())
            .put("capabilities", JSONObject().put("codecs", JSONArray(Updates.names)))
        val answer = try {
            transport.call("POST", Protocol.CHECKIN, body)
        } catch (e: ApiException) {
            // Only the coordinator's own code says it no longer knows the device: a gateway's 401
            // page in front of it says nothing about the credential, and dropping the identity
            // for it would orphan the device's history.
            if (e.status != 401 || e.code != ErrorCode.UNAUTHORIZED) throw e
            // The coordinator no longer knows this credential (its database was reset).
            state.forgetCredentials()
            transport.credentials = null
            ensureRegistered()
            transport.call("POST", Protocol.CHECKIN, body)
        } ?: throw TransportException("empty check-in answer")
        return when (val action = answer.optString("action")) {
            "wait" -> {
                val retryAfter = answer.optDouble("retry_after_s", 60.0)
                // A device told to wait forever never returns; one told a negative wait would check
                // in again at once, pass after pass, against a coordinator already saying no.
                if (!retryAfter.isFinite() || retryAfter < 0) throw TransportException("check-in answer's retry_after_s is $retryAfter")
                Outcome(Outcome.WAIT, jittered(minOf(retryAfter, MAX_ASKED_WAIT_S)), reasons = listOf(answer.optString("reason")))
            }
            "train", "evaluate" -> assignment(action, answer.getJSONObject("assignment"))
            else -> throw TransportException("unknown check-in answer $answer")
        }
    }

    private fun ensureRegistered() {
        if (transport.credentials != null) return
        var creds = state.loadCredentials(transport.baseUrl)
        if (creds == null) {
            val body = JSONObject()
                .put("platform", "android")
                .put("arch", System.getProperty("os.arch") ?: "unknown")
                .put("runtimes", JSONArray(RUNTIMES))
                .put("population", config.population)
            val headers = config.enrollmentToken?.let { mapOf(Protocol.HEADER_ENROLLMENT to it) } ?: emptyMap()
            val answer = transport.call("POST", Protocol.REGISTER, body, headers) ?: throw TransportException("empty registration answer")
            creds = Credentials(transport.baseUrl, answer.getString("device_id"), answer.getString("secret"))
            if (!Protocol.SAFE_ID.matches(creds.deviceId) || !SECRET.matches(creds.secret)) {
                // Stored, it could never be sent: every later pass would fail before reaching the
                // coordinator, with no 401 to make the device register again.
                throw TransportException("registration answer's device id or secret cannot be sent in an Authorization header")
            }
            state.saveCredentials(creds)
        }
        transport.credentials = Pair(creds.deviceId, creds.secret)
    }

    private fun trainerFor(dir: File, manifest: Manifest): OrtStepTrainer {
        val held = trainer
        if (held != null && held.manifest.bundleId == manifest.bundleId) return held
        held?.close()
        return OrtStepTrainer(dir, manifest).also { trainer = it }
    }

    private fun assignment(action: String, a: JSONObject): Outcome {
        val id = a.getString("assignment_id")
        // Refused before any work: it goes into the update/abort/metrics paths, and an upload kept
        // pending for an id that cannot be sent as it is would be resent before every check-in.
        if (!Protocol.SAFE_ID.matches(id)) throw TransportException("assignment id '$id' is not a protocol id")
        val taskId = a.getString("task_id")
        val round = a.getInt("round")
        val down0 = transport.bytesReceived
        val started = clock()
        val paramsUrl = a.getString("params_url")
        if (!paramsUrl.startsWith(Protocol.API_PREFIX + "/")) throw TransportException("assignment's params_url '$paramsUrl' is not an API path")
        if (action == "train" && a.optJSONObject("plan")?.has("secagg") == true) {
            // Secure aggregation (docs/protocol.md) is not implemented here yet: refuse before
            // downloading anything, and free the slot so the round need not wait for us.
            log.warning("assignment $id asks for secure aggregation, which this client does not implement")
            val answer = abort(id, "error", "download", "unsupported", SECAGG_UNSUPPORTED)
            return Outcome(Outcome.REJECTED, paced(answer, config.afterAssignmentS), id, taskId, round, error = SECAGG_UNSUPPORTED)
        }
        phase = "download"
        return try {
            val (dir, manifest) = cache.fetch(transport, a.getString("bundle_id"))
            val params = Updates.decode(transport.request("GET", paramsUrl).body, expectedLength = manifest.numParameters)
            phase = "runtime_load"
            val t = trainerFor(dir, manifest)
            phase = "training"
            if (action == "evaluate") evaluate(id, taskId, round, t, params, a.optJSONObject("plan")) else train(id, taskId, round, a, t, params, started, down0)
        } catch (e: ConditionsLapsed) {
            val answer = abort(id, "conditions_lapsed", "conditions_lapsed", "conditions")
            Outcome(Outcome.ABORTED, paced(answer, config.ineligibleRecheckS), id, taskId, round, reasons = e.reasons)
        } catch (e: ApiException) {
            throw e // the coordinator refused: nothing to tell it
        } catch (e: TransportException) {
            throw e
        } catch (e: Exception) {
            // A local failure (bad plan, broken bundle, runtime error): free the slot now
            // instead of letting the round wait for its deadline.
            log.log(Level.WARNING, "assignment $id failed on the device", e)
            abort(id, "error", phase, failureCode(e))
            val f = failed(e)
            Outcome(Outcome.FAILED, f.nextRunInS, id, taskId, round, error = f.error)
        }
    }

    private fun train(
        id: String, taskId: String, round: Int, a: JSONObject, t: OrtStepTrainer, params: FloatArray, started: Double, down0: Long,
    ): Outcome {
        val plan = Plan.fromJson(a.getJSONObject("plan"))
        val local = if (plan.batchnorm == "local") state.localLayers(taskId) else null
        val result = LocalTraining.train(t, data, plan, params, round, rng, recheck = ::ineligibility, stopped = stop::get, local = local)
        phase = "upload"
        val trained = t.getParameters()
        val trainedDelta = FloatArray(trained.size) { trained[it] - params[it] }
        // DP-FedAvg: bound what this update can say before encoding it
        val delta = plan.dpClip?.let { Dp.clipToNorm(trainedDelta, it) } ?: trainedDelta
        val feedback = if (plan.codec.usesErrorFeedback) state.errorFeedback(taskId) else null
        val encoded = Updates.encode(delta, plan.codec, { rng.nextDouble() }, feedback?.load(delta.size))
        val frame = encoded.frame
        val report = JSONObject()
            .put("num_examples", result.numExamples)
            .put("loss", result.loss)
            .put("steps", result.steps)
            .put("wall_time_s", clock() - started)
            .put("bytes_down", transport.bytesReceived - down0)
        // The key is a digest of what is sent: a retry of these bytes (even from a restarted
        // process) is the same upload, anything else a different one.
        val md = MessageDigest.getInstance("SHA-256")
        md.update(id.toByteArray(Charsets.UTF_8))
        val key = md.digest(frame).joinToString("") { "%02x".format(it.toInt() and 0xff) }.take(32)
        val pending = PendingUpload(transport.baseUrl, deviceId!!, id, taskId, round, key, report, frame, if (feedback != null) encoded.residual else null)
        // Durable before the first byte leaves: whatever happens to the answer, the next pass
        // can resend exactly this and learn whether it counted.
        state.savePending(pending)
        val metrics = JSONObject(report.toString()).put("bytes_up", frame.size)
        val answer = try {
            deliver(pending)
        } catch (e: ApiException) {
            if (e.status == 401 || e.transient) throw e
            // The slot is freed at once, as the Python client does; a 409's round is closed.
            if (e.status != 409) abort(id, "error", "upload", "refused")
            return Outcome(Outcome.REJECTED, jittered(config.afterAssignmentS), id, taskId, round, metrics = metrics, error = e.code, uploaded = frame)
        }
        return Outcome(Outcome.TRAINED, paced(answer, config.afterAssignmentS), id, taskId, round, metrics = metrics, uploaded = frame, answer = answer)
    }

    /**
     * Sends [p] and settles it by the answer: acknowledged (its residual becomes the task's;
     * the answer is returned) or refused with a 4xx (dropped, the residual stays; rethrown).
     * No answer (network, 5xx, a rate limiter's 429) leaves it pending for the next pass.
     */
    private fun deliver(p: PendingUpload): JSONObject? {
        val headers = mapOf(
            "Content-Type" to Protocol.FRAME_CONTENT_TYPE,
            Protocol.HEADER_IDEMPOTENCY_KEY to p.key,
            Protocol.HEADER_REPORT to p.report.toString(),
        )
        var answer: JSONObject? = null
        try {
            val response = transport.request("POST", Protocol.assignmentUpdate(p.assignmentId), p.frame, headers)
            answer = try { Protocol.parseObject(String(response.body, Charsets.UTF_8)) } catch (_: org.json.JSONException) { null }
        } catch (e: ApiException) {
            if (!countedEarlier(e)) {
                // A 4xx is a refusal, not an outage: a counted upload's key always gets its stored
                // answer. A 429 is a rate limiter's, not the coordinator's: nothing was refused.
                if (!e.transient) state.clearPending()
                throw e
            }
        }
        state.commitPending(p)
        return answer
    }

    /** Settles an upload a previous pass sent without seeing the answer, before anything else. */
    private fun resolvePending() {
        val p = state.loadPending() ?: return
        if (p.coordinator != transport.baseUrl || p.deviceId != deviceId) {
            state.clearPending() // another coordinator or identity: nobody can answer for it
            return
        }
        try {
            deliver(p)
            log.info("pending upload ${p.assignmentId} acknowledged on resend")
        } catch (e: ApiException) {
            if (e.transient) throw e
            log.info("pending upload ${p.assignmentId} was refused (${e.code}); residual unchanged")
        }
    }

    private fun evaluate(id: String, taskId: String, round: Int, t: OrtStepTrainer, params: FloatArray, plan: JSONObject?): Outcome {
        // FedBN tasks evaluate with the device's own batch norm layers (if it has any yet).
        val local = if (plan?.optString("batchnorm") == "local") state.localLayers(taskId) else null
        val result = LocalTraining.evaluate(t, evalData, params, local)
        val metrics = JSONObject().put("num_examples", result.numExamples).put("loss", result.loss)
        result.accuracy?.let { metrics.put("accuracy", it) }
        val answer = try {
            transport.call("POST", Protocol.assignmentMetrics(id), metrics)
        } catch (e: ApiException) {
            if (!countedEarlier(e)) throw e
            null
        }
        return Outcome(Outcome.EVALUATED, paced(answer, config.afterAssignmentS), id, taskId, round, metrics = metrics, answer = answer)
    }

    /**
     * Tells the coordinator where ([phase]) and why ([code]) the assignment ended on the device
     * (the enumerations of docs/protocol.md, "Abort": never free text or data); its answer
     * (pace steering), or null if there is none.
     */
    private fun abort(id: String, reason: String, phase: String, code: String, message: String? = null): JSONObject? = try {
        val body = JSONObject().put("reason", reason).put("phase", phase).put("code", code)
        if (message != null) body.put("message", message)
        transport.call("POST", Protocol.assignmentAbort(id), body)
    } catch (e: ApiException) {
        // 409: the round closed while we trained, so there is no slot left to free.
        if (e.status != 409) log.warning("could not tell the coordinator about the abort of $id: ${e.message}")
        null
    } catch (e: TransportException) {
        log.warning("could not tell the coordinator about the abort of $id: ${e.message}") // the deadline frees the slot
        null
    }

    /** The abort's `code` for a local failure (edge_sdk.protocol.DeviceErrorCode). */
    private fun failureCode(e: Exception): String = when (e) {
        is dev.fedge.android.frame.FrameException, is dev.fedge.android.codec.UpdateException,
        is dev.fedge.android.protocol.CacheException -> "integrity"
        is dev.fedge.android.trainer.BundleNotSupported -> "unsupported"
        is PlanException -> "invalid_plan"
        is ArithmeticException -> "non_finite"
        is ai.onnxruntime.OrtException -> "runtime_error"
        else -> "other"
    }

    /** `duplicate_upload` on a retry: the first try was counted before its answer was lost. */
    private fun countedEarlier(e: ApiException) = e.code == ErrorCode.DUPLICATE_UPLOAD && e.attempt > 1

    override fun close() {
        trainer?.close()
        trainer = null
    }

    companion object {
        /** The runtime this library trains with (the protocol's `runtimes`). */
        const val RUNTIME = "ort-step"
        /** The error of an [Outcome] (and the abort's message) for a SecAgg task this client refuses. */
        const val SECAGG_UNSUPPORTED = "secagg_unsupported: secure aggregation is not implemented by the Android client"
        private val RUNTIMES = listOf(RUNTIME)
        /**
         * The longest wait a coordinator's answer sets (its pacing stays within an hour by
         * default). A larger one is a mistake (a wrong unit, a broken coordinator), and the job
         * scheduled that far out would lose the device to the fleet.
         */
        const val MAX_ASKED_WAIT_S = 24 * 3600.0
        /** A device secret: visible ASCII, what a header value carries unchanged. */
        private val SECRET = Regex("^[!-~]{1,512}$")
        private val log = Logger.getLogger(Client::class.java.name)
    }
}
