package dev.fedge.android.protocol

import com.sun.net.httpserver.HttpsConfigurator
import com.sun.net.httpserver.HttpsServer
import org.junit.After
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.BeforeClass
import org.junit.Test
import java.io.File
import java.net.InetSocketAddress
import java.nio.file.Files
import java.security.KeyStore
import java.security.MessageDigest
import java.util.Base64
import java.util.concurrent.atomic.AtomicInteger
import javax.net.ssl.KeyManagerFactory
import javax.net.ssl.SSLContext

/**
 * HTTPS against a real TLS server on loopback with a self-signed certificate (made by the
 * JDK's keytool): trusted through a CA file, pinned, and refused with a wrong pin before any
 * request reaches the server.
 */
class TlsTest {
    private val requests = AtomicInteger()
    private val server: HttpsServer = HttpsServer.create(InetSocketAddress("127.0.0.1", 0), 0)

    init {
        val ks = KeyStore.getInstance("PKCS12").apply { keystore.inputStream().use { load(it, "secret".toCharArray()) } }
        val kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm()).apply { init(ks, "secret".toCharArray()) }
        val context = SSLContext.getInstance("TLS").apply { init(kmf.keyManagers, null, null) }
        server.httpsConfigurator = HttpsConfigurator(context)
        server.createContext("/") { ex ->
            requests.incrementAndGet()
            val body = """{"ok": true}""".toByteArray()
            ex.sendResponseHeaders(200, body.size.toLong())
            ex.responseBody.use { it.write(body) }
        }
        server.start()
    }

    private val url get() = "https://127.0.0.1:${server.address.port}"

    private fun pin(): String {
        val ks = KeyStore.getInstance("PKCS12").apply { keystore.inputStream().use { load(it, "secret".toCharArray()) } }
        val spki = ks.getCertificate("s").publicKey.encoded
        return "sha256/" + Base64.getEncoder().encodeToString(MessageDigest.getInstance("SHA-256").digest(spki))
    }

    @After
    fun stop() = server.stop(0)

    companion object {
        private val dir = Files.createTempDirectory("tls").toFile()
        private val keystore = File(dir, "server.p12")
        private val pem = File(dir, "ca.pem")

        /** One self-signed certificate for 127.0.0.1 for the whole class (keytool takes seconds). */
        @BeforeClass
        @JvmStatic
        fun makeCertificate() {
            val keytool = File(System.getProperty("java.home"), "bin/keytool").path
            fun run(vararg args: String) {
                val p = ProcessBuilder(keytool, *args).redirectErrorStream(true).start()
                val out = p.inputStream.readBytes()
                check(p.waitFor() == 0) { String(out) }
            }
            run("-genkeypair", "-alias", "s", "-keyalg", "EC", "-groupname", "secp256r1", "-validity", "2", "-dname", "CN=127.0.0.1",
                "-ext", "SAN=ip:127.0.0.1", "-keystore", keystore.path, "-storetype", "PKCS12", "-storepass", "secret")
            run("-exportcert", "-rfc", "-alias", "s", "-keystore", keystore.path, "-storepass", "secret", "-file", pem.path)
        }
    }

    @Test
    fun theCoordinatorsOwnCaAndItsPinAreAccepted() {
        val t = Transport(url, RetryPolicy(maxAttempts = 1), tls = TlsConfig(caFile = pem, pinSha256 = pin()))
        assertEquals(true, t.call("GET", "/v1/health")!!.getBoolean("ok"))
        t.credentials = Pair("d-1", "s")
        assertEquals(true, t.call("POST", "/v1/checkin", org.json.JSONObject().put("x", 1))!!.getBoolean("ok"))
        assertEquals(2, requests.get())
    }

    @Test
    fun anUnknownCertificateIsRefused() {
        val t = Transport(url, RetryPolicy(maxAttempts = 1)) // the system's CAs do not know it
        try {
            t.call("GET", "/v1/health")
            fail("self-signed certificate accepted")
        } catch (e: TransportException) {
            assertTrue(e.message!!.contains("after 1 attempts"))
        }
        assertEquals(0, requests.get())
    }

    @Test
    fun aWrongPinEndsTheConnectionBeforeAnythingIsSent() {
        val wrong = "sha256/" + Base64.getEncoder().encodeToString(ByteArray(32))
        val t = Transport(url, RetryPolicy(maxAttempts = 3), tls = TlsConfig(caFile = pem, pinSha256 = wrong))
        try {
            t.request("POST", "/v1/assignments/a/update", byteArrayOf(1, 2, 3))
            fail("wrong pin accepted")
        } catch (e: TlsException) {
            assertTrue(e.message!!.contains("does not match the pin"))
        }
        assertEquals(0, requests.get()) // not retried, nothing sent
        try {
            Transport("http://127.0.0.1:1", tls = TlsConfig(pinSha256 = pin()))
            fail("a pin on plain HTTP accepted")
        } catch (e: IllegalArgumentException) {
        }
    }
}
