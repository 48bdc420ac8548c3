package dev.fedge.android.client

import org.json.JSONObject

/**
 * A snapshot of the device's state; null means unknown. The first six are the check-in's
 * `conditions` (docs/protocol.md); [throttled] and [freeStorageMb] are for the local policy only.
 */
data class DeviceConditions @JvmOverloads constructor(
    val charging: Boolean? = null,
    val battery: Double? = null,
    val idle: Boolean? = null,
    val unmetered: Boolean? = null,
    val freeMemoryMb: Double? = null,
    val temperatureC: Double? = null,
    /** Thermal throttling now (Android: thermal status SEVERE or worse). */
    val throttled: Boolean? = null,
    val freeStorageMb: Double? = null,
) {
    /** The check-in's `conditions` object: known values only. */
    fun toJson(): JSONObject {
        val o = JSONObject()
        charging?.let { o.put("charging", it) }
        battery?.let { o.put("battery", it) }
        idle?.let { o.put("idle", it) }
        unmetered?.let { o.put("unmetered", it) }
        freeMemoryMb?.let { o.put("free_memory_mb", it) }
        temperatureC?.let { o.put("temperature_c", it) }
        return o
    }
}

/** Where conditions come from: the Android framework ([dev.fedge.android.os.AndroidConditions]) or a test's script. */
fun interface ConditionsProvider {
    fun read(): DeviceConditions
}

/**
 * When the device may train: by default idle AND charging AND unmetered, the same rule as
 * Python's `EligibilityPolicy`. An unknown value fails the requirement on it.
 */
data class EligibilityPolicy @JvmOverloads constructor(
    val requireIdle: Boolean = true,
    val requireCharging: Boolean = true,
    val requireUnmetered: Boolean = true,
    val minBattery: Double? = null,
    val minFreeMemoryMb: Double? = null,
    val maxTemperatureC: Double? = null,
    val allowThrottled: Boolean = true,
    val minFreeStorageMb: Double? = null,
) {
    /** The reasons the device may not train (empty: it may). */
    fun check(c: DeviceConditions): List<String> {
        val reasons = ArrayList<String>()
        fun flag(name: String, value: Boolean?, failing: String) {
            if (value == null) reasons.add("$name unknown") else if (!value) reasons.add(failing)
        }
        fun bound(name: String, value: Double?, limit: Double?, atLeast: Boolean, failing: String) {
            if (limit == null) return
            if (value == null) reasons.add("$name unknown") else if (if (atLeast) value < limit else value > limit) reasons.add(failing)
        }
        if (requireIdle) flag("idle", c.idle, "not idle")
        if (requireCharging) flag("charging", c.charging, "not charging")
        if (requireUnmetered) flag("unmetered", c.unmetered, "network metered")
        bound("battery", c.battery, minBattery, true, "battery ${c.battery} below $minBattery")
        bound("free_memory_mb", c.freeMemoryMb, minFreeMemoryMb, true, "free memory ${c.freeMemoryMb} MB below $minFreeMemoryMb MB")
        bound("temperature_c", c.temperatureC, maxTemperatureC, false, "temperature ${c.temperatureC} C above $maxTemperatureC C")
        bound("free_storage_mb", c.freeStorageMb, minFreeStorageMb, true, "free storage ${c.freeStorageMb} MB below $minFreeStorageMb MB")
        if (!allowThrottled && c.throttled == true) reasons.add("thermal throttling")
        return reasons
    }

    companion object {
        /** Train whatever the conditions (development, benchmarks). */
        @JvmStatic
        fun permissive() = EligibilityPolicy(requireIdle = false, requireCharging = false, requireUnmetered = false)

        /**
         * The default rule plus the run-time checks a phone needs while it trains: not
         * thermally throttled, battery at least 20 % (also on the charger), 200 MB storage free.
         */
        @JvmStatic
        fun android() = EligibilityPolicy(minBattery = 0.2, allowThrottled = false, minFreeStorageMb = 200.0)
    }
}
