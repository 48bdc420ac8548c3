package dev.fedge.android.client

import dev.fedge.android.codec.ErrorFeedback
import dev.fedge.android.protocol.Protocol.SAFE_ID
import org.json.JSONObject
import java.io.File

/** The credential the coordinator issued at registration. */
data class Credentials(val coordinator: String, val deviceId: String, val secret: String)

/**
 * What a device keeps between runs, in [root] (on Android: a folder of `Context.getFilesDir()`):
 * `credentials.json` (readable by the app only), `residuals/<task_id>.f32frame` (the
 * error-feedback residuals), `local_layers/<task_id>.f32frame` (FedBN's batch norm layers) and
 * `pending/` (an upload whose answer has not arrived yet). Every write goes to a temporary file,
 * fsync'ed, renamed into place and its directory fsync'ed ([Durable]), so a step is on disk
 * before the next one relies on it.
 */
class DeviceState(val root: File) {
    init {
        root.mkdirs()
    }

    private val credentialsFile get() = File(root, "credentials.json")

    /** The stored credential for [coordinator], or null (none, another coordinator's, unreadable). */
    fun loadCredentials(coordinator: String): Credentials? = try {
        val o = JSONObject(credentialsFile.readText(Charsets.UTF_8))
        Credentials(o.getString("coordinator"), o.getString("device_id"), o.getString("secret")).takeIf { it.coordinator == coordinator }
    } catch (e: Exception) {
        null
    }

    fun saveCredentials(c: Credentials) {
        val body = JSONObject().put("coordinator", c.coordinator).put("device_id", c.deviceId).put("secret", c.secret)
        // Owner-only before the secret is written; durable, else a power cut could lose it and the
        // device would register again as someone else.
        Durable.writeFile(credentialsFile, body.toString().toByteArray(Charsets.UTF_8))
    }

    fun forgetCredentials() {
        credentialsFile.delete()
    }

    /** The residual store of [taskId] (see [ErrorFeedback]). */
    fun errorFeedback(taskId: String): ErrorFeedback {
        require(SAFE_ID.matches(taskId)) { "task id '$taskId' is not safe as a file name" }
        return ErrorFeedback(File(File(root, "residuals"), "$taskId.f32frame"))
    }

    private val pendingDir get() = File(root, "pending")

    /** An upload sent without seeing its answer yet (see [PendingUpload]), or null. */
    fun loadPending(): PendingUpload? = PendingUpload.load(pendingDir).also { if (it == null) pendingDir.deleteRecursively() }

    fun savePending(p: PendingUpload) = p.save(pendingDir)

    /**
     * Settles an acknowledged upload: its residual becomes the task's, then it is gone. The
     * residual's rename is durable before the pending upload goes (ErrorFeedback.save fsyncs
     * its directory): else a power cut could keep the old residual and lose the pending upload,
     * and the old residual would be sent a second time.
     */
    fun commitPending(p: PendingUpload) {
        if (p.residual != null) errorFeedback(p.taskId).save(p.residual)
        clearPending()
    }

    fun clearPending() {
        pendingDir.deleteRecursively()
    }

    /** The device's own batch norm layers of [taskId] under FedBN. */
    fun localLayers(taskId: String): dev.fedge.android.trainer.LocalLayers {
        require(SAFE_ID.matches(taskId)) { "task id '$taskId' is not safe as a file name" }
        return dev.fedge.android.trainer.LocalLayers(File(File(root, "local_layers"), "$taskId.f32frame"))
    }
}
