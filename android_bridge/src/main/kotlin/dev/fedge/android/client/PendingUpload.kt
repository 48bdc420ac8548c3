package dev.fedge.android.client

import dev.fedge.android.frame.Frame
import org.json.JSONObject
import java.io.File
import java.io.FileOutputStream

/**
 * An update written to the state directory before its first byte is sent, so that an answer
 * lost to the network or to the process being killed (common on a phone) is learnt at the next
 * pass: the same bytes go again under the same idempotency key, the coordinator answers a
 * repeat with its stored answer, and the error-feedback residual the encoding left becomes the
 * task's only once that answer is an acknowledgement.
 */
class PendingUpload(
    val coordinator: String,
    val deviceId: String,
    val assignmentId: String,
    val taskId: String,
    val round: Int,
    val key: String,
    val report: JSONObject,
    val frame: ByteArray,
    /** The residual to keep once acknowledged; null for codecs without error feedback. */
    val residual: FloatArray?,
) {
    /** Stores it under [dir] (replacing any): files in a fresh folder, renamed into place, all fsync'ed. */
    fun save(dir: File) {
        val tmp = File(dir.parentFile, ".${dir.name}.tmp")
        tmp.deleteRecursively()
        tmp.mkdirs()
        val meta = JSONObject().put("coordinator", coordinator).put("device_id", deviceId).put("assignment_id", assignmentId)
            .put("task_id", taskId).put("round", round).put("key", key).put("report", report).put("feedback", residual != null)
        write(File(tmp, "upload.frame"), frame)
        residual?.let { write(File(tmp, "residual.f32frame"), Frame.encodeFloats(it)) }
        write(File(tmp, "meta.json"), meta.toString().toByteArray(Charsets.UTF_8)) // last: marks it complete
        Durable.syncDirectory(tmp) // the files' entries, before the folder is renamed into place
        dir.deleteRecursively()
        if (!tmp.renameTo(dir)) throw java.io.IOException("could not store the pending upload")
        // Durable before the upload is sent: lost after the coordinator counted it, the old
        // residual would stay and be sent again with the next update.
        Durable.syncDirectory(dir.parentFile)
    }

    companion object {
        private fun write(file: File, data: ByteArray) = FileOutputStream(file).use { it.write(data); it.fd.sync() }

        /** The pending upload in [dir], or null (none, or unreadable: then nothing can be resent). */
        @JvmStatic
        fun load(dir: File): PendingUpload? = try {
            val meta = JSONObject(File(dir, "meta.json").readText(Charsets.UTF_8))
            val frame = File(dir, "upload.frame").readBytes()
            val residual = if (meta.getBoolean("feedback")) {
                dev.fedge.android.codec.Updates.decode(File(dir, "residual.f32frame").readBytes())
            } else {
                null
            }
            PendingUpload(
                meta.getString("coordinator"), meta.getString("device_id"), meta.getString("assignment_id"),
                meta.getString("task_id"), meta.getInt("round"), meta.getString("key"), meta.getJSONObject("report"), frame, residual,
            )
        } catch (e: Exception) {
            null
        }
    }
}
