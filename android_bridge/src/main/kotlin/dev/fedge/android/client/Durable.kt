package dev.fedge.android.client

import java.io.File
import java.nio.channels.FileChannel
import java.nio.file.StandardOpenOption

/**
 * Making a rename durable (edge_sdk/state.py's `_fsync_dir`): fsync'ing a file's data does not
 * make its directory entry durable, so after a power cut a rename could be lost while later
 * steps (another directory's, or the coordinator's) survive. Every state write fsyncs the file,
 * renames it into place, then fsyncs the directory with [syncDirectory].
 */
object Durable {
    /** Called with each directory once it was fsync'ed; for tests of the order of the steps. */
    @Volatile
    @JvmStatic
    var onDirectorySynced: ((File) -> Unit)? = null

    /** Makes the renames and deletions in [dir] durable. */
    @JvmStatic
    fun syncDirectory(dir: File) {
        FileChannel.open(dir.toPath(), StandardOpenOption.READ).use { it.force(true) }
        onDirectorySynced?.invoke(dir)
    }
}
