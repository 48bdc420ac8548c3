package dev.fedge.android.client

import com.sun.net.httpserver.HttpServer
import dev.fedge.android.protocol.CacheException
import dev.fedge.android.protocol.RetryPolicy
import dev.fedge.android.protocol.Transport
import org.json.JSONObject
import org.junit.After
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.net.InetSocketAddress
import java.nio.file.Files
import java.util.Collections

/**
 * The bundle cache over real HTTP, on the committed test bundle (exported by
 * src/test/make_test_bundle.py): the manifest must hash to its id (canonical JSON, as the
 * Python exporter computes it), files are sha256-checked, resumed and repaired.
 */
class BundleCacheTest {
    private val bundle = File(javaClass.getResource("/bundle/manifest.json")!!.toURI()).parentFile
    private val manifestText = File(bundle, "manifest.json").readText()
    private val bundleId = JSONObject(manifestText).getString("bundle_id")
    private val server = HttpServer.create(InetSocketAddress("127.0.0.1", 0), 0)
    private val requests: MutableList<Pair<String, String?>> = Collections.synchronizedList(ArrayList())
    private var corruptOnce = mutableSetOf<String>()
    private var manifestServed = manifestText
    /** Names the server serves under another name's content (decoded path -> file of the test bundle). */
    private val aliases = mutableMapOf<String, String>()

    init {
        server.createContext("/") { ex ->
            val path = ex.requestURI.path
            val range = ex.requestHeaders.getFirst("Range")
            requests.add(Pair(path, range))
            val name = path.substringAfterLast('/')
            var data = if (!path.contains("/files/")) manifestServed.toByteArray() else File(bundle, aliases[name] ?: name).readBytes()
            if (corruptOnce.remove(path.substringAfterLast('/'))) data = data.copyOf().also { it[it.size / 2] = (it[it.size / 2] + 1).toByte() }
            val from = range?.removePrefix("bytes=")?.removeSuffix("-")?.toInt() ?: 0
            if (from > 0) ex.responseHeaders.add("Content-Range", "bytes $from-${data.size - 1}/${data.size}")
            val body = data.copyOfRange(from, data.size)
            ex.sendResponseHeaders(if (from > 0) 206 else 200, body.size.toLong())
            ex.responseBody.use { it.write(body) }
        }
        server.start()
    }

    private val transport = Transport("http://127.0.0.1:${server.address.port}", RetryPolicy(maxAttempts = 2, baseDelayS = 0.01))
    private val root = Files.createTempDirectory("cache").toFile()

    @After
    fun stop() = server.stop(0)

    @Test
    fun theCanonicalIdOfTheExportedManifestIsItsBundleId() {
        assertEquals(bundleId, CanonicalJson.bundleId(manifestText))
        assertEquals(bundleId, Manifest.parse(manifestText).bundleId)
        // any change to the content changes the id: a tampered manifest is refused
        val tampered = manifestText.replace("\"lr\": 0.05", "\"lr\": 0.5")
        assertTrue(tampered != manifestText)
        try {
            Manifest.parse(tampered)
            fail("tampered manifest accepted")
        } catch (e: CacheException) {
            assertTrue(e.message!!.contains("bundle_id"))
        }
    }

    @Test
    fun aFilesEntryThatIsNotAShaAndAByteCountIsACacheException() {
        // A manifest hashing to its id with a malformed entry: before, reading its files threw
        // a JSONException out of the cache (the Python SDK's BundleError since 44ebfc0).
        for (entry in listOf("{\"sha256\": \"ab\"}", "{\"sha256\": \"ab\", \"bytes\": true}",
            "{\"sha256\": \"ab\", \"bytes\": 1.5}", "{\"sha256\": 7, \"bytes\": 3}",
            "{\"sha256\": \"ab\", \"bytes\": -1}", "\"ab\"")) {
            val raw = JSONObject(manifestText)
            raw.getJSONObject("files").put("extra.bin", JSONObject("{\"e\": $entry}").get("e"))
            raw.remove("bundle_id")
            raw.put("bundle_id", CanonicalJson.bundleId(raw.toString()))
            try {
                Manifest.parse(raw.toString()).files
                fail("accepted $entry")
            } catch (e: CacheException) {
                assertTrue(e.message!!, e.message!!.contains("files['extra.bin']"))
            }
        }
    }

    @Test
    fun aBundleIsFetchedOnceAndVerified() {
        val cache = BundleCache(root)
        val (dir, manifest) = cache.fetch(transport, bundleId)
        for ((name, _) in manifest.files) assertArrayEquals(File(bundle, name).readBytes(), File(dir, name).readBytes())
        val first = requests.size
        assertEquals(1 + manifest.files.size, first)
        BundleCache(root).fetch(transport, bundleId) // a new process: verified from disk, no request
        assertEquals(first, requests.size)
    }

    @Test
    fun aPartialFileResumesAndACorruptOneIsFetchedAgain() {
        val dir = File(root, bundleId)
        val partial = File(File(dir, ".partial"), "step.onnx")
        partial.parentFile.mkdirs()
        partial.writeBytes(File(bundle, "step.onnx").readBytes().copyOf(1000)) // an interrupted download
        corruptOnce.add("eval.onnx")
        BundleCache(root).fetch(transport, bundleId)
        assertTrue(requests.contains(Pair("/v1/bundles/$bundleId/files/step.onnx", "bytes=1000-")))
        assertEquals(2, requests.count { it.first.endsWith("/eval.onnx") })
        for (name in listOf("step.onnx", "eval.onnx")) assertArrayEquals(File(bundle, name).readBytes(), File(dir, name).readBytes())
        // damage on disk is noticed and repaired at the next fetch
        File(dir, "infer.onnx").writeBytes(byteArrayOf(1, 2, 3))
        BundleCache(root).fetch(transport, bundleId)
        assertArrayEquals(File(bundle, "infer.onnx").readBytes(), File(dir, "infer.onnx").readBytes())
    }

    @Test
    fun aManifestThatDoesNotHashToTheAskedIdIsRefusedBeforeAnyFile() {
        manifestServed = manifestText.replace("\"lr\": 0.05", "\"lr\": 0.06")
        try {
            BundleCache(root).fetch(transport, bundleId)
            fail("accepted")
        } catch (e: CacheException) {
            assertTrue(e.message!!.contains("bad manifest"))
        }
        assertEquals(1, requests.size)
    }

    @Test
    fun fileNamesThatNeedQuotingInAUrlAreFetched() {
        // The manifest allows any relative name; in the URL it must be percent-encoded, or a
        // space would not go into a request line and a '?' would start a query.
        val odd = "my model%?.onnx"
        val renamed = manifestText.replace("\"infer.onnx\"", "\"$odd\"")
        val id = CanonicalJson.bundleId(renamed)
        manifestServed = renamed.replace(bundleId, id)
        aliases[odd] = "infer.onnx"
        val (dir, _) = BundleCache(root).fetch(transport, id)
        assertArrayEquals(File(bundle, "infer.onnx").readBytes(), File(dir, odd).readBytes())
        assertTrue(requests.toString(), requests.any { it.first == "/v1/bundles/$id/files/$odd" })
    }
}
