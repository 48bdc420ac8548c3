/**
 * The Android layer: device conditions read from the framework ([AndroidConditions]), the job
 * registered with JobScheduler under the eligibility constraints ([TrainingScheduler]) and the
 * [TrainingJobService] that runs one client pass per job and stops cleanly when told to.
 */
package dev.fedge.android.os

import android.app.ActivityManager
import android.content.Context
import android.content.Intent
import android.content.IntentFilter
import android.net.ConnectivityManager
import android.net.NetworkCapabilities
import android.os.BatteryManager
import android.os.Build
import android.os.PowerManager
import android.os.StatFs
import dev.fedge.android.client.ConditionsProvider
import dev.fedge.android.client.DeviceConditions

/**
 * Conditions from the Android framework, read afresh on every call (the client reads them
 * before checking in and every `recheck_every_steps` steps while it trains):
 *
 * - `charging`, `battery`, `temperature_c`: the sticky `ACTION_BATTERY_CHANGED` broadcast
 *   (plugged into any power source; level / scale; battery temperature);
 * - `idle`: `PowerManager` device-idle (Doze) mode, or the screen off (not interactive): the
 *   user is not using the phone. JobScheduler's idle constraint gates the start; this run-time
 *   reading notices the user coming back during training;
 * - `unmetered`: the active network's `NetworkCapabilities` has `NOT_METERED` (no network: false);
 * - `free_memory_mb`: `ActivityManager.MemoryInfo.availMem`;
 * - local only: `throttled` (`PowerManager.getCurrentThermalStatus() >= SEVERE`, API 29+;
 *   unknown before) and `free storage` of the app's files directory.
 */
class AndroidConditions(context: Context) : ConditionsProvider {
    private val context = context.applicationContext ?: context

    override fun read(): DeviceConditions {
        val battery = context.registerReceiver(null, IntentFilter(Intent.ACTION_BATTERY_CHANGED))
        val level = battery?.getIntExtra(BatteryManager.EXTRA_LEVEL, -1) ?: -1
        val scale = battery?.getIntExtra(BatteryManager.EXTRA_SCALE, -1) ?: -1
        val plugged = battery?.getIntExtra(BatteryManager.EXTRA_PLUGGED, -1) ?: -1
        val tenthsC = battery?.getIntExtra(BatteryManager.EXTRA_TEMPERATURE, Int.MIN_VALUE) ?: Int.MIN_VALUE
        val power = context.getSystemService(Context.POWER_SERVICE) as PowerManager?
        return DeviceConditions(
            charging = if (plugged < 0) null else plugged != 0,
            battery = if (level >= 0 && scale > 0) (level.toDouble() / scale).coerceIn(0.0, 1.0) else null,
            idle = power?.let { it.isDeviceIdleMode || !it.isInteractive },
            unmetered = unmetered(),
            freeMemoryMb = freeMemoryMb(),
            temperatureC = if (tenthsC == Int.MIN_VALUE) null else (tenthsC / 10.0).takeIf { it in -40.0..150.0 },
            throttled = if (power != null && Build.VERSION.SDK_INT >= 29) {
                power.currentThermalStatus >= PowerManager.THERMAL_STATUS_SEVERE
            } else {
                null
            },
            freeStorageMb = try {
                StatFs(context.filesDir.path).availableBytes / MB
            } catch (e: IllegalArgumentException) {
                null
            },
        )
    }

    private fun unmetered(): Boolean? {
        val connectivity = context.getSystemService(Context.CONNECTIVITY_SERVICE) as ConnectivityManager? ?: return null
        val network = connectivity.activeNetwork ?: return false
        val caps = connectivity.getNetworkCapabilities(network) ?: return false
        return caps.hasCapability(NetworkCapabilities.NET_CAPABILITY_NOT_METERED)
    }

    private fun freeMemoryMb(): Double? {
        val am = context.getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager? ?: return null
        val info = ActivityManager.MemoryInfo()
        am.getMemoryInfo(info)
        return if (info.availMem > 0) info.availMem / MB else null
    }

    private companion object {
        const val MB = 1024.0 * 1024.0
    }
}
