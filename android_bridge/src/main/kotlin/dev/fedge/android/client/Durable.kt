package dev.fedge.android.client

import java.io.File
import java.nio.channels.FileChannel
import java.nio.file.StandardOpenOption

/**
 * Making a rename durable (edge_sdk/state.py's `_fsync_dir`): fsync'ing a file's data does not
 * make its directory entry durable, so after a power cut a rename could be lost while later
 * steps (another directory's, or the coordinator's) survive. Every state write fsyncs the file,
 * renames it into place, then fsyncs the directory ([writeFile], with [syncDirectory]).
 */
object Durable {
    /** Called with each directory once it was fsync'ed; for tests of the order of the steps. */
    @Volatile
    @JvmStatic
    var onDirectorySynced: ((File) -> Unit)? = null

    /**
     * Replaces [file] with [bytes], atomically and durably once this returns: a fresh temporary
     * file beside it, readable by this app's user alone from before its first byte, synced,
     * renamed into place, then the directory synced.
     */
    @JvmStatic
    fun writeFile(file: File, bytes: ByteArray) {
        val dir = file.parentFile ?: File(".")
        dir.mkdirs()
        val tmp = File(dir, ".${file.name}.tmp")
        tmp.delete()
        tmp.createNewFile()
        tmp.setReadable(false, false); tmp.setReadable(true, true)
        tmp.setWritable(false, false); tmp.setWritable(true, true)
        java.io.FileOutputStream(tmp).use { it.write(bytes); it.fd.sync() }
        if (!tmp.renameTo(file)) throw java.io.IOException("could not replace $file")
        syncDirectory(dir)
    }

    /** Makes the renames and deletions in [dir] durable. */
    @JvmStatic
    fun syncDirectory(dir: File) {
        FileChannel.open(dir.toPath(), StandardOpenOption.READ).use { it.force(true) }
        onDirectorySynced?.invoke(dir)
    }
}
