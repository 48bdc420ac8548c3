package dev.fedge.android.codec

import dev.fedge.android.frame.Frame
import java.io.File
import java.util.logging.Logger

/**
 * The error-feedback residual of one task, kept on the device between rounds in [file] as a raw
 * float32 frame (checksummed, so a damaged file is noticed). [load] never fails a round: a
 * missing, unreadable or mismatched file means starting from zeros (null).
 */
class ErrorFeedback(val file: File) {
    fun load(length: Int): FloatArray? {
        if (!file.isFile) return null
        val residual = try {
            Updates.decode(file.readBytes(), expectedLength = length)
        } catch (e: Exception) {
            log.warning("ignoring unreadable error-feedback residual $file: ${e.message}")
            return null
        }
        return residual
    }

    /** Replaces the stored residual atomically and durably (null clears it). */
    fun save(residual: FloatArray?) {
        if (residual == null) {
            file.delete()
            return
        }
        // Durable before the caller goes on (a pending upload's commit removes the upload next,
        // which must not survive a power cut that this write does not).
        dev.fedge.android.client.Durable.writeFile(file, Frame.encodeFloats(residual))
    }

    private companion object {
        val log: Logger = Logger.getLogger(ErrorFeedback::class.java.name)
    }
}
