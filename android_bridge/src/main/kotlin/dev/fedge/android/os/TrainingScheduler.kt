package dev.fedge.android.os

import android.app.job.JobInfo
import android.app.job.JobScheduler
import android.content.ComponentName
import android.content.Context
import dev.fedge.android.client.EligibilityPolicy

/**
 * Registers the training job with JobScheduler so that the system starts it only when the
 * policy's conditions hold: charging, device idle, an unmetered network, battery not low
 * (Google's rule for federated jobs), persisted across reboots (the app needs the
 * `RECEIVE_BOOT_COMPLETED` permission), and not before the coordinator's come-back time
 * (`setMinimumLatency`: pace steering).
 *
 * ```
 * TrainingScheduler(context, MyTrainingJobService::class.java).schedule(0.0)
 * ```
 */
class TrainingScheduler @JvmOverloads constructor(
    context: Context,
    private val service: Class<out TrainingJobService>,
    private val policy: EligibilityPolicy = EligibilityPolicy(),
    val jobId: Int = DEFAULT_JOB_ID,
) {
    private val context = context.applicationContext ?: context

    private val jobs: JobScheduler
        get() = context.getSystemService(Context.JOB_SCHEDULER_SERVICE) as JobScheduler

    /** The job that runs no sooner than [delaySeconds] from now, under the policy's constraints. */
    fun jobInfo(delaySeconds: Double): JobInfo =
        JobInfo.Builder(jobId, ComponentName(context, service))
            .setRequiresCharging(policy.requireCharging)
            .setRequiresDeviceIdle(policy.requireIdle)
            .setRequiredNetworkType(if (policy.requireUnmetered) JobInfo.NETWORK_TYPE_UNMETERED else JobInfo.NETWORK_TYPE_ANY)
            .setRequiresBatteryNotLow(true)
            .setPersisted(true)
            .setMinimumLatency((maxOf(0.0, delaySeconds) * 1000).toLong())
            .build()

    /** Replaces any pending run by one no sooner than [delaySeconds] from now; false if refused. */
    fun schedule(delaySeconds: Double): Boolean = jobs.schedule(jobInfo(delaySeconds)) == JobScheduler.RESULT_SUCCESS

    fun cancel() = jobs.cancel(jobId)

    /** The pending job, if one is scheduled. */
    fun pending(): JobInfo? = jobs.allPendingJobs.firstOrNull { it.id == jobId }

    companion object {
        const val DEFAULT_JOB_ID = 0x0fed6e
    }
}
