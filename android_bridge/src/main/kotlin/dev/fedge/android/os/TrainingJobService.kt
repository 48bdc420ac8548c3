package dev.fedge.android.os

import android.app.job.JobParameters
import android.app.job.JobService
import dev.fedge.android.client.Client
import dev.fedge.android.client.EligibilityPolicy
import dev.fedge.android.client.Outcome
import java.util.concurrent.TimeUnit
import java.util.logging.Logger

/**
 * The job the system starts when the device is charging, idle and on an unmetered network:
 * one [Client.runOnce] on a worker thread, then the next job is scheduled at the come-back time
 * the pass ended with (the coordinator's `retry_after_s` plus jitter).
 *
 * When the system stops the job (a constraint no longer holds, or its time is up),
 * [onStopJob] asks the client to stop: training ends before its next step, the assignment is
 * aborted at the coordinator (`conditions_lapsed`) so its slot is freed at once, nothing is
 * uploaded, and the next run is scheduled. Conditions that lapse during training without the
 * system noticing (the run-time checks of [AndroidConditions] under [EligibilityPolicy.android])
 * end the pass the same way.
 *
 * An app subclasses it, builds its [Client] (coordinator URL, enrollment token, its data) in
 * [createClient], and declares it in its manifest with `android.permission.BIND_JOB_SERVICE`.
 */
abstract class TrainingJobService : JobService() {
    @Volatile
    private var client: Client? = null
    private var worker: Thread? = null

    /** The app's client; [AndroidConditions] and [EligibilityPolicy.android] are the usual choice. */
    protected abstract fun createClient(): Client

    /** The scheduler that registers this service's next run (override for another job id or policy). */
    protected open fun scheduler(): TrainingScheduler = TrainingScheduler(this, javaClass)

    /** The last pass's outcome (for the app's status screen and tests). */
    @Volatile
    var lastOutcome: Outcome? = null
        private set

    override fun onStartJob(params: JobParameters?): Boolean {
        val c = client ?: createClient().also { client = it }
        val thread = Thread({
            val outcome = c.runOnce()
            lastOutcome = outcome
            log.info("fedge pass: $outcome")
            // Finished first: scheduling this job's id while it still runs would stop it.
            jobFinished(params, false)
            scheduler().schedule(outcome.nextRunInS)
        }, "fedge-training")
        worker = thread
        thread.start()
        return true // the work goes on in the worker thread
    }

    override fun onStopJob(params: JobParameters?): Boolean {
        client?.requestStop()
        // The abort is a short request; waiting for it keeps the process alive until it is sent.
        worker?.join(TimeUnit.SECONDS.toMillis(STOP_GRACE_S))
        return false // the worker scheduled the next run itself
    }

    /** Waits for a pass started by [onStartJob] to end (tests, orderly shutdown). */
    fun awaitPass(timeoutMs: Long): Boolean {
        val t = worker ?: return true
        t.join(timeoutMs)
        return !t.isAlive
    }

    override fun onDestroy() {
        client?.close()
        client = null
        super.onDestroy()
    }

    private companion object {
        const val STOP_GRACE_S = 5L
        val log: Logger = Logger.getLogger(TrainingJobService::class.java.name)
    }
}
