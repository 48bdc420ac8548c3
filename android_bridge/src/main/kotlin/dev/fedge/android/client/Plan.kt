package dev.fedge.android.client

import dev.fedge.android.codec.CodecSpec
import org.json.JSONObject

/** An assignment's plan the device cannot run (missing fields, out-of-range values). */
class PlanException(message: String) : IllegalArgumentException(message)

/** The `plan` of an assignment (docs/protocol.md, "Check in"); `steps`, when set, replaces `epochs`. */
data class Plan(
    val batchSize: Int,
    val lr: Double,
    val epochs: Int?,
    val steps: Int?,
    val lrDecay: Double = 1.0,
    val proxMu: Double = 0.0,
    val codec: CodecSpec = CodecSpec("fp32"),
    /** 0: never re-check the conditions during training. */
    val recheckEverySteps: Int = 0,
    /** `aggregate`, or `local` (FedBN): batch norm layers stay on the device. */
    val batchnorm: String = "aggregate",
    /** A DP-FedAvg task's `dp.clip`: the L2 norm the delta is clipped to ([Dp]); null without DP. */
    val dpClip: Double? = null,
) {
    init {
        if ((epochs == null) == (steps == null)) throw PlanException("a plan needs exactly one of 'epochs' and 'steps'")
        if (batchSize < 1 || (epochs ?: 1) < 1 || (steps ?: 1) < 1) throw PlanException("epochs, steps and batch_size must be at least 1")
        for ((name, v) in listOf("lr" to lr, "lr_decay" to lrDecay, "prox_mu" to proxMu)) {
            if (!v.isFinite() || v < 0) throw PlanException("plan '$name' must be a finite number >= 0, got $v")
        }
        if (recheckEverySteps < 0) throw PlanException("plan 'recheck_every_steps' must be >= 0")
        if (batchnorm !in BATCHNORM_MODES) throw PlanException("plan 'batchnorm' must be aggregate or local, got '$batchnorm'")
        if (dpClip != null && !(dpClip.isFinite() && dpClip > 0)) throw PlanException("plan 'dp.clip' must be a positive finite number, got $dpClip")
    }

    /** The round's client learning rate: `lr * lr_decay^round`. */
    fun lrForRound(round: Int): Double = lr * Math.pow(lrDecay, maxOf(round, 0).toDouble())

    companion object {
        val BATCHNORM_MODES = listOf("aggregate", "local")

        @JvmStatic
        fun fromJson(o: JSONObject): Plan {
            fun num(key: String): Double? {
                if (!o.has(key) || o.isNull(key)) return null
                val v = o.get(key)
                if (v !is Number) throw PlanException("plan '$key' must be a number, got $v")
                return v.toDouble()
            }
            fun int(key: String, default: Int?): Int? {
                val v = num(key) ?: return default
                if (v != Math.floor(v) || v > Int.MAX_VALUE || v < Int.MIN_VALUE) throw PlanException("plan '$key' must be an integer, got $v")
                return v.toInt()
            }
            val lr = num("lr") ?: throw PlanException("plan lacks 'lr'")
            val dp = o.opt("dp")
            if (dp != null && dp != JSONObject.NULL && dp !is JSONObject) throw PlanException("plan 'dp' must be an object, got $dp")
            val clip = (dp as? JSONObject)?.opt("clip")?.takeIf { it != JSONObject.NULL }
            if (clip != null && clip !is Number) throw PlanException("plan 'dp.clip' must be a positive finite number, got $clip")
            val steps = int("steps", null)
            return try {
                Plan(
                    batchSize = int("batch_size", 32)!!,
                    lr = lr,
                    epochs = if (steps != null) null else int("epochs", 1),
                    steps = steps,
                    lrDecay = num("lr_decay") ?: 1.0,
                    proxMu = num("prox_mu") ?: 0.0,
                    codec = CodecSpec.fromJson(o.opt("codec") ?: "fp32"),
                    recheckEverySteps = int("recheck_every_steps", 0)!!,
                    batchnorm = o.opt("batchnorm") as? String ?: "aggregate",
                    dpClip = (clip as Number?)?.toDouble(),
                )
            } catch (e: IllegalArgumentException) {
                throw PlanException(e.message ?: "bad plan")
            }
        }
    }
}
