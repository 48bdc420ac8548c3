package dev.fedge.android.client

import dev.fedge.android.protocol.CacheException
import dev.fedge.android.protocol.Protocol
import dev.fedge.android.protocol.Transport
import java.io.File
import java.security.MessageDigest

/**
 * Bundles downloaded once, verified against their manifest, resumed and repaired.
 *
 * `<root>/<bundle_id>/` holds `manifest.json` and the files; a file being fetched lives at
 * `<root>/<bundle_id>/.partial/<name>` until its sha256 matches, then it is renamed into place.
 * An interrupted download resumes from the partial file's size with `Range` (in this process
 * or the next); a mismatch deletes the file and fetches it once more, a second one throws
 * [CacheException]; the manifest must hash to the bundle id the coordinator named.
 */
class BundleCache(val root: File) {
    /** Files downloaded (partly or wholly) by this object. */
    var filesFetched = 0
        private set

    /** The verified bundle directory and manifest, downloading what is missing or corrupt. */
    @Synchronized
    fun fetch(transport: Transport, bundleId: String): Pair<File, Manifest> {
        if (!BUNDLE_ID.matches(bundleId)) throw CacheException("bundle id '$bundleId' is not a sha256 hex digest")
        val dir = File(root, bundleId)
        val manifest = manifest(transport, bundleId, dir)
        for ((name, meta) in manifest.files) ensureFile(transport, bundleId, dir, name, meta.first, meta.second)
        return Pair(dir, manifest)
    }

    private fun manifest(transport: Transport, bundleId: String, dir: File): Manifest {
        val path = File(dir, "manifest.json")
        if (path.isFile) {
            val cached = try { Manifest.load(dir) } catch (e: Exception) { null }
            if (cached != null && cached.bundleId == bundleId) return cached
        }
        val body = transport.request("GET", Protocol.bundleManifest(bundleId)).body
        val manifest = try {
            Manifest.parse(String(body, Charsets.UTF_8))
        } catch (e: CacheException) {
            throw CacheException("coordinator sent a bad manifest for $bundleId: ${e.message}")
        }
        if (manifest.bundleId != bundleId) throw CacheException("asked for bundle $bundleId, got a manifest of ${manifest.bundleId}")
        dir.mkdirs()
        val tmp = File(dir, ".manifest.json.tmp")
        tmp.writeBytes(body)
        if (!tmp.renameTo(path)) throw CacheException("could not store the manifest of $bundleId")
        return manifest
    }

    private fun ensureFile(transport: Transport, bundleId: String, dir: File, name: String, sha256: String, size: Long) {
        val final = File(dir, name)
        if (final.isFile) {
            if (final.length() == size && sha256(final) == sha256) return
            final.delete() // damaged on disk: fetch it again
        }
        val partial = File(File(dir, ".partial"), name)
        partial.parentFile.mkdirs()
        for (attempt in 1..2) {
            // A partial file of full size (the app died before the rename) needs no request.
            if (!partial.isFile || partial.length() < size) {
                transport.download(Protocol.bundleFile(bundleId, name), partial, size)
                filesFetched++
            }
            if (partial.length() == size && sha256(partial) == sha256) {
                final.parentFile.mkdirs()
                if (!partial.renameTo(final)) throw CacheException("could not move $name into place")
                return
            }
            partial.delete() // a resumed tail on a stale head, or a bad transfer: start over
        }
        throw CacheException("bundle file $name of $bundleId does not match its sha256 after a re-fetch")
    }

    companion object {
        private val BUNDLE_ID = Regex("^[0-9a-f]{64}$")

        @JvmStatic
        fun sha256(file: File): String {
            val md = MessageDigest.getInstance("SHA-256")
            file.inputStream().use { input ->
                val buf = ByteArray(1 shl 16)
                while (true) {
                    val k = input.read(buf)
                    if (k < 0) break
                    md.update(buf, 0, k)
                }
            }
            return md.digest().joinToString("") { "%02x".format(it.toInt() and 0xff) }
        }
    }
}
