/**
 * The device client: bundles and their cache, the device's state on disk, the assignment's
 * plan, device conditions and the eligibility policy, and [Client], one pass of the loop.
 */
package dev.fedge.android.client

import dev.fedge.android.protocol.CacheException
import dev.fedge.android.protocol.Protocol
import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.security.MessageDigest

/** One trainable tensor in the flat parameter vector's layout. */
class ParamSpec(val name: String, val shape: LongArray, val offset: Int) {
    val size: Int get() = shape.fold(1L) { a, d -> a * d }.toInt()
}

/** A bundle's `manifest.json` (formats 1 and 2: edge_sdk/bundle.py), checked on construction. */
class Manifest(val raw: JSONObject) {
    init {
        if (raw.optString("format") != "fedge-bundle" || raw.optInt("format_version", -1) !in READABLE_VERSIONS) {
            throw CacheException(
                "unsupported bundle format ${raw.opt("format")} version ${raw.opt("format_version")} " +
                    "(this library reads fedge-bundle ${READABLE_VERSIONS.joinToString()})",
            )
        }
        for (key in listOf("bundle_id", "parameters", "num_parameters", "files", "loss", "task")) {
            if (!raw.has(key)) throw CacheException("manifest lacks '$key'")
        }
        val files = raw.optJSONObject("files") ?: throw CacheException("manifest 'files' must be an object")
        for (name in files.keys()) {
            if (name.startsWith("/") || name.split('/', '\\').any { it == ".." || it.isEmpty() }) {
                throw CacheException("manifest names an unsafe file path '$name'")
            }
            // Read as they are by [files] and the cache: anything else would escape as a JSONException.
            val meta = files.optJSONObject(name)
            val size = meta?.opt("bytes")
            if (meta?.opt("sha256") !is String || (size !is Int && size !is Long) || size.toLong() < 0) {
                throw CacheException("manifest files['$name'] must be an object with a 'sha256' string and a 'bytes' count")
            }
        }
        var expected = 0
        for (p in parameters + buffers) {
            if (p.offset != expected) throw CacheException("parameter ${p.name} offset ${p.offset} != $expected")
            expected += p.size
        }
        if (expected != numParameters) throw CacheException("parameter layout covers $expected, manifest says $numParameters")
    }

    val bundleId: String get() = raw.getString("bundle_id")
    val numParameters: Int get() = raw.getInt("num_parameters")
    val loss: String get() = raw.getString("loss")
    val numClasses: Int? get() = if (raw.isNull("num_classes")) null else raw.getInt("num_classes")

    val parameters: List<ParamSpec>
        get() = specs(raw.getJSONArray("parameters"))

    private fun specs(a: JSONArray) = (0 until a.length()).map {
        val p = a.getJSONObject(it)
        ParamSpec(p.getString("name"), longs(p.getJSONArray("shape")), p.getInt("offset"))
    }

    /** Batch norm running statistics, after the trainable parameters in the model vector (format 2). */
    val buffers: List<ParamSpec>
        get() = specs(raw.optJSONArray("buffers") ?: JSONArray())

    /** Whether the step graphs take an int64 `seed` input (dropout masks; format 2). */
    val stepSeed: Boolean get() = raw.optBoolean("step_seed", false)

    /** Positions in the model vector of the batch norm layers' parameters and statistics (FedBN). */
    fun batchnormIndices(): IntArray {
        val a = raw.optJSONArray("batchnorm_modules") ?: return IntArray(0)
        val modules = (0 until a.length()).map { a.getString(it) }.toSet()
        return (parameters + buffers).filter { it.name.substringBeforeLast('.', "") in modules }
            .flatMap { (it.offset until it.offset + it.size).toList() }.toIntArray()
    }

    /** name -> (sha256, bytes) of every file the bundle lists. */
    val files: Map<String, Pair<String, Long>>
        get() {
            val f = raw.getJSONObject("files")
            return f.keys().asSequence().associateWith { Pair(f.getJSONObject(it).getString("sha256"), f.getJSONObject(it).getLong("bytes")) }
        }

    /** The bundle-relative file of graph [key] (e.g. `step_onnx`), which must be a listed file. */
    fun graph(key: String): String {
        val name = raw.optJSONObject("graphs")?.opt(key) as? String
            ?: throw CacheException("bundle ${bundleId.take(12)} has no $key graph; re-export it with this fedge")
        if (name !in files) throw CacheException("graph $name is not among the bundle's files")
        return name
    }

    companion object {
        /** Manifest format versions this library reads (1 is 2 without buffers and seed). */
        @JvmField
        val READABLE_VERSIONS = listOf(1, 2)

        internal fun longs(a: JSONArray) = LongArray(a.length()) { a.getLong(it) }

        /** Reads and checks `manifest.json` text, including that it hashes to its own bundle id. */
        @JvmStatic
        fun parse(text: String): Manifest {
            val manifest = try {
                Manifest(Protocol.parseObject(text))
            } catch (e: org.json.JSONException) {
                throw CacheException("malformed manifest: ${e.message}")
            }
            if (CanonicalJson.bundleId(text) != manifest.bundleId) throw CacheException("bundle_id does not match the manifest's content")
            return manifest
        }

        @JvmStatic
        fun load(dir: File): Manifest = parse(File(dir, "manifest.json").readText(Charsets.UTF_8))
    }
}

/**
 * The bundle id: sha256 of the manifest without `bundle_id` in canonical JSON, which is what
 * Python's `json.dumps(m, sort_keys=True, separators=(",", ":"))` writes (docs/protocol.md,
 * "Bundles"): keys sorted, no spaces, non-ASCII and control characters as lower-case `\uXXXX`,
 * numbers as written (the exporter writes Python's shortest repr).
 */
internal object CanonicalJson {
    fun bundleId(text: String): String {
        val out = StringBuilder()
        Parser(text).top(out)
        val digest = MessageDigest.getInstance("SHA-256").digest(out.toString().toByteArray(Charsets.US_ASCII))
        return digest.joinToString("") { "%02x".format(it.toInt() and 0xff) }
    }

    private class Parser(val s: String) {
        var i = 0

        fun top(out: StringBuilder) {
            ws()
            value(out, dropBundleId = true)
            ws()
            if (i != s.length) fail("trailing characters")
        }

        fun fail(why: String): Nothing = throw CacheException("manifest is not valid JSON at $i: $why")

        fun ws() {
            while (i < s.length && s[i] in " \t\r\n") i++
        }

        fun value(out: StringBuilder, dropBundleId: Boolean = false) {
            ws()
            if (i >= s.length) fail("unexpected end")
            when (val c = s[i]) {
                '{' -> obj(out, dropBundleId)
                '[' -> arr(out)
                '"' -> quote(string(), out)
                else -> {
                    val start = i
                    while (i < s.length && s[i] !in ",]} \t\r\n") i++
                    val token = s.substring(start, i)
                    if (token.isEmpty()) fail("unexpected '$c'")
                    out.append(token)
                }
            }
        }

        fun obj(out: StringBuilder, dropBundleId: Boolean) {
            i++
            val members = java.util.TreeMap<String, String>()
            ws()
            if (s[i] == '}') i++ else while (true) {
                ws()
                if (s[i] != '"') fail("expected a key")
                val key = string()
                ws()
                if (s[i++] != ':') fail("expected ':'")
                val v = StringBuilder()
                value(v)
                members[key] = v.toString() // the last duplicate wins, as in Python
                ws()
                val c = s[i++]
                if (c == '}') break
                if (c != ',') fail("expected ',' or '}'")
            }
            if (dropBundleId) members.remove("bundle_id")
            out.append('{')
            var first = true
            for ((k, v) in members) {
                if (!first) out.append(',')
                first = false
                quote(k, out)
                out.append(':').append(v)
            }
            out.append('}')
        }

        fun arr(out: StringBuilder) {
            i++
            out.append('[')
            ws()
            if (s[i] == ']') { i++; out.append(']'); return }
            while (true) {
                value(out)
                ws()
                val c = s[i++]
                if (c == ']') break
                if (c != ',') fail("expected ',' or ']'")
                out.append(',')
            }
            out.append(']')
        }

        fun string(): String {
            i++
            val b = StringBuilder()
            while (true) {
                if (i >= s.length) fail("unterminated string")
                val c = s[i++]
                when (c) {
                    '"' -> return b.toString()
                    '\\' -> {
                        when (val e = s[i++]) {
                            'n' -> b.append('\n'); 't' -> b.append('\t'); 'r' -> b.append('\r')
                            'b' -> b.append('\b'); 'f' -> b.append('\u000c')
                            'u' -> { b.append(s.substring(i, i + 4).toInt(16).toChar()); i += 4 }
                            else -> b.append(e)
                        }
                    }
                    else -> b.append(c)
                }
            }
        }

        fun quote(v: String, out: StringBuilder) {
            out.append('"')
            for (c in v) {
                when {
                    c == '"' -> out.append("\\\"")
                    c == '\\' -> out.append("\\\\")
                    c == '\n' -> out.append("\\n")
                    c == '\r' -> out.append("\\r")
                    c == '\t' -> out.append("\\t")
                    c == '\b' -> out.append("\\b")
                    c == '\u000c' -> out.append("\\f")
                    c < ' ' || c > '~' -> out.append("\\u%04x".format(c.code))
                    else -> out.append(c)
                }
            }
            out.append('"')
        }
    }
}
