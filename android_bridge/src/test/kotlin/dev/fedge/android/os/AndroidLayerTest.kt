package dev.fedge.android.os

import android.app.ActivityManager
import android.app.job.JobInfo
import android.content.Context
import android.content.Intent
import android.net.ConnectivityManager
import android.net.NetworkCapabilities
import android.os.BatteryManager
import android.os.PowerManager
import org.robolectric.RuntimeEnvironment
import dev.fedge.android.client.Client
import dev.fedge.android.client.ClientConfig
import dev.fedge.android.client.EligibilityPolicy
import dev.fedge.android.client.Outcome
import dev.fedge.android.codec.Updates
import dev.fedge.android.protocol.RetryPolicy
import dev.fedge.android.trainer.Batch
import dev.fedge.android.trainer.Dataset
import org.json.JSONObject
import org.junit.After
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Before
import org.junit.Test
import org.junit.runner.RunWith
import org.robolectric.Robolectric
import org.robolectric.RobolectricTestRunner
import org.robolectric.Shadows.shadowOf
import org.robolectric.annotation.Config
import org.robolectric.shadows.ShadowNetworkCapabilities
import org.robolectric.shadows.ShadowStatFs
import java.io.File
import java.util.Random
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit

/** What the hook in [HookedData] does when training reaches batch [HookedData.at]. */
private var onBatch: (Int) -> Unit = {}
private lateinit var coordinator: FakeCoordinator

/** Random digits-shaped examples; calls [onBatch] as each batch is handed to the trainer. */
private class HookedData : Dataset {
    override val numExamples = 160

    override fun batches(batchSize: Int, rng: Random): Iterator<Batch> {
        var k = 0
        return generateSequence {
            val i = k++
            onBatch(i)
            Batch.classification(FloatArray(batchSize * 64) { rng.nextFloat() }, LongArray(batchSize) { rng.nextInt(10).toLong() })
        }.take(numExamples / batchSize).iterator()
    }
}

/** The app's job service as an app would write it: framework conditions, the Android policy. */
class TestJobService : TrainingJobService() {
    override fun createClient(): Client = Client(
        coordinator = coordinator.url,
        stateDir = File(filesDir, "fedge"),
        data = HookedData(),
        conditions = AndroidConditions(this),
        policy = EligibilityPolicy.android(),
        config = ClientConfig(enrollmentToken = coordinator.enrollmentToken, seed = 1, retry = RetryPolicy(maxAttempts = 2, baseDelayS = 0.01)),
    )
}

/**
 * The Android layer on Robolectric (framework classes from android-all, offline): conditions
 * read from the framework, the job's constraints, and a pass that is stopped by the system or
 * whose conditions lapse mid-training ending in a clean abort at the coordinator.
 */
@RunWith(RobolectricTestRunner::class)
@Config(sdk = [34])
class AndroidLayerTest {
    private val context: Context = RuntimeEnvironment.getApplication()
    private val power get() = context.getSystemService(Context.POWER_SERVICE) as PowerManager
    private val connectivity get() = context.getSystemService(Context.CONNECTIVITY_SERVICE) as ConnectivityManager

    private fun battery(level: Int, plugged: Int, tenthsC: Int = 312) = context.sendStickyBroadcast(
        Intent(Intent.ACTION_BATTERY_CHANGED)
            .putExtra(BatteryManager.EXTRA_LEVEL, level).putExtra(BatteryManager.EXTRA_SCALE, 100)
            .putExtra(BatteryManager.EXTRA_PLUGGED, plugged).putExtra(BatteryManager.EXTRA_TEMPERATURE, tenthsC),
    )

    private fun network(unmetered: Boolean) {
        val caps = ShadowNetworkCapabilities.newInstance()
        shadowOf(caps).addCapability(NetworkCapabilities.NET_CAPABILITY_INTERNET)
        if (unmetered) shadowOf(caps).addCapability(NetworkCapabilities.NET_CAPABILITY_NOT_METERED)
        shadowOf(connectivity).setNetworkCapabilities(connectivity.activeNetwork, caps)
    }

    private fun storage(freeMb: Int) = ShadowStatFs.registerStats(context.filesDir, 1_000_000, freeMb * 256, freeMb * 256)

    @Before
    fun eligibleDevice() {
        battery(80, BatteryManager.BATTERY_PLUGGED_AC)
        shadowOf(power).setIsInteractive(false)
        shadowOf(power).setIsDeviceIdleMode(false)
        shadowOf(power).setCurrentThermalStatus(PowerManager.THERMAL_STATUS_NONE)
        network(unmetered = true)
        storage(4096)
        val memory = ActivityManager.MemoryInfo().apply { availMem = 1500L * 1024 * 1024 }
        shadowOf(context.getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager).setMemoryInfo(memory)
        onBatch = {}
    }

    @After
    fun stopCoordinator() {
        if (::coordinator.isInitialized) coordinator.close()
    }

    @Test
    fun conditionsComeFromTheFramework() {
        val c = AndroidConditions(context).read()
        assertEquals(true, c.charging)
        assertEquals(0.8, c.battery!!, 1e-9)
        assertEquals(true, c.idle)
        assertEquals(true, c.unmetered)
        assertEquals(31.2, c.temperatureC!!, 1e-9)
        assertEquals(1500.0, c.freeMemoryMb!!, 1e-9)
        assertEquals(4096.0, c.freeStorageMb!!, 1e-9)
        assertEquals(false, c.throttled)
        val sent = c.toJson() // the check-in's conditions: the protocol's six keys, nothing local
        assertEquals(setOf("charging", "battery", "idle", "unmetered", "free_memory_mb", "temperature_c"), sent.keys().asSequence().toSet())
        assertTrue(EligibilityPolicy.android().check(c).isEmpty())
    }

    @Test
    fun eachLapsedConditionIsNamed() {
        val conditions = AndroidConditions(context)
        val policy = EligibilityPolicy.android()
        shadowOf(power).setIsInteractive(true) // the user picked the phone up
        assertEquals(listOf("not idle"), policy.check(conditions.read()))
        shadowOf(power).setIsDeviceIdleMode(true) // Doze counts as idle whatever the screen says
        assertEquals(emptyList<String>(), policy.check(conditions.read()))
        battery(80, 0)
        assertEquals(listOf("not charging"), policy.check(conditions.read()))
        battery(80, BatteryManager.BATTERY_PLUGGED_USB)
        network(unmetered = false)
        assertEquals(listOf("network metered"), policy.check(conditions.read()))
        network(unmetered = true)
        shadowOf(power).setCurrentThermalStatus(PowerManager.THERMAL_STATUS_SEVERE)
        assertEquals(listOf("thermal throttling"), policy.check(conditions.read()))
        shadowOf(power).setCurrentThermalStatus(PowerManager.THERMAL_STATUS_LIGHT)
        storage(50)
        assertEquals(1, policy.check(conditions.read()).size)
        assertTrue(policy.check(conditions.read())[0].startsWith("free storage"))
        // the default (Python SDK's) policy has no storage rule
        assertTrue(EligibilityPolicy().check(conditions.read()).isEmpty())
    }

    @Test
    fun theJobWaitsForChargingIdleUnmeteredAndTheComeBackTime() {
        val scheduler = TrainingScheduler(context, TestJobService::class.java)
        assertTrue(scheduler.schedule(42.5))
        val job = assertNotNull(scheduler.pending()).let { scheduler.pending()!! }
        assertTrue(job.isRequireCharging)
        assertTrue(job.isRequireDeviceIdle)
        assertEquals(JobInfo.NETWORK_TYPE_UNMETERED, @Suppress("DEPRECATION") job.networkType)
        assertTrue(job.isRequireBatteryNotLow)
        assertTrue(job.isPersisted)
        assertEquals(42_500L, job.minLatencyMillis)
        assertEquals(TestJobService::class.java.name, job.service.className)
        // a permissive policy drops the constraints, not the come-back time
        val loose = TrainingScheduler(context, TestJobService::class.java, EligibilityPolicy.permissive()).jobInfo(3.0)
        assertFalse(loose.isRequireCharging || loose.isRequireDeviceIdle)
        assertEquals(JobInfo.NETWORK_TYPE_ANY, @Suppress("DEPRECATION") loose.networkType)
        assertEquals(3_000L, loose.minLatencyMillis)
        scheduler.cancel()
        assertNull(scheduler.pending())
    }

    private fun startCoordinator(steps: Int) {
        val plan = JSONObject().put("steps", steps).put("batch_size", 8).put("lr", 0.05).put("recheck_every_steps", 2)
            .put("codec", JSONObject().put("name", "int8").put("bits", 8).put("block", 64))
        coordinator = FakeCoordinator(File(javaClass.getResource("/bundle/manifest.json")!!.toURI()).parentFile, plan)
    }

    private fun pendingLatencyS() = TrainingScheduler(context, TestJobService::class.java).pending()!!.minLatencyMillis / 1000.0

    @Test
    fun aPassTrainsUploadsAndSchedulesTheNextAtTheComeBackTime() {
        startCoordinator(steps = 6)
        val service = Robolectric.setupService(TestJobService::class.java)
        assertTrue(service.onStartJob(null))
        assertTrue(service.awaitPass(60_000))
        assertEquals(Outcome.TRAINED, service.lastOutcome!!.action)
        val (headers, frame) = coordinator.uploads.single()
        assertEquals(32, headers.getValue("idempotency-key").length)
        assertEquals(160, JSONObject(headers.getValue("x-fedge-report")).getInt("num_examples"))
        assertEquals(2410, Updates.decode(frame, expectedLength = 2410).size)
        assertTrue(coordinator.aborts.isEmpty())
        assertTrue(pendingLatencyS() in 17.0..17.0 * 1.1) // the answer's retry_after_s plus jitter
    }

    @Test
    fun aStopFromTheSystemAbortsAtTheCoordinatorAndUploadsNothing() {
        startCoordinator(steps = 20)
        val service = Robolectric.setupService(TestJobService::class.java)
        val reached = CountDownLatch(1)
        onBatch = { k ->
            if (k == 3) {
                reached.countDown()
                Thread.sleep(500) // the system's onStopJob arrives while this step is under way
            }
        }
        assertTrue(service.onStartJob(null))
        assertTrue(reached.await(60, TimeUnit.SECONDS))
        assertFalse(service.onStopJob(null))
        assertTrue(service.awaitPass(30_000))
        val outcome = service.lastOutcome!!
        assertEquals(Outcome.ABORTED, outcome.action)
        assertEquals(listOf("stopped by the system"), outcome.reasons)
        assertEquals("conditions_lapsed", coordinator.aborts.single().getString("reason"))
        assertTrue(coordinator.uploads.isEmpty())
        assertTrue(pendingLatencyS() in 42.0..42.0 * 1.1) // the abort answer's pace steering
    }

    @Test
    fun conditionsLapsingMidTrainingAbortToo() {
        startCoordinator(steps = 20)
        val service = Robolectric.setupService(TestJobService::class.java)
        onBatch = { k -> if (k == 3) shadowOf(power).setIsInteractive(true) }
        assertTrue(service.onStartJob(null))
        assertTrue(service.awaitPass(60_000))
        val outcome = service.lastOutcome!!
        assertEquals(Outcome.ABORTED, outcome.action)
        assertEquals(listOf("not idle"), outcome.reasons)
        val abort = coordinator.aborts.single()
        assertEquals("conditions_lapsed", abort.getString("reason"))
        assertEquals("conditions_lapsed", abort.getString("phase"))
        assertEquals("conditions", abort.getString("code"))
        assertFalse(abort.has("message")) // enumerations only, never free text
        assertTrue(coordinator.uploads.isEmpty())
    }
}
