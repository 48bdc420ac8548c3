package dev.fedge.android.protocol

import java.io.File
import java.security.KeyStore
import java.security.MessageDigest
import java.security.cert.CertificateFactory
import java.security.cert.X509Certificate
import java.util.Base64
import javax.net.ssl.HttpsURLConnection
import javax.net.ssl.SSLContext
import javax.net.ssl.SSLSocketFactory
import javax.net.ssl.TrustManagerFactory

/** A TLS certificate or pin that does not check: the connection ends before anything is sent. */
class TlsException(message: String) : FedgeException(message)

/**
 * HTTPS options (docs/protocol.md, "TLS"): [caFile], a PEM bundle to trust instead of the
 * system's CAs (for a coordinator with its own CA); [pinSha256], the server's public-key pin as
 * `fedge serve` prints it (base64 of SHA-256 over the DER SubjectPublicKeyInfo, with or without
 * `sha256/`, or hex). The chain and host name are verified in every case.
 */
class TlsConfig @JvmOverloads constructor(val caFile: File? = null, val pinSha256: String? = null) {
    private val pin: ByteArray? = pinSha256?.let { parsePin(it) }

    internal val socketFactory: SSLSocketFactory? by lazy {
        val file = caFile ?: return@lazy null
        val certs = try {
            file.inputStream().use { CertificateFactory.getInstance("X.509").generateCertificates(it) }
        } catch (e: Exception) {
            throw TlsException("cannot load CA bundle $file: ${e.message}")
        }
        if (certs.isEmpty()) throw TlsException("no certificate in CA bundle $file")
        val store = KeyStore.getInstance(KeyStore.getDefaultType()).apply { load(null, null) }
        certs.forEachIndexed { i, c -> store.setCertificateEntry("ca$i", c) }
        val tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm()).apply { init(store) }
        SSLContext.getInstance("TLS").apply { init(null, tmf.trustManagers, null) }.socketFactory
    }

    internal fun configure(conn: HttpsURLConnection) {
        socketFactory?.let { conn.sslSocketFactory = it }
    }

    /** After the handshake, before anything is sent: the leaf's key must match the pin. */
    internal fun checkPin(conn: HttpsURLConnection) {
        val want = pin ?: return
        val leaf = conn.serverCertificates.firstOrNull() as? X509Certificate
            ?: throw TlsException("the server sent no certificate")
        val got = MessageDigest.getInstance("SHA-256").digest(leaf.publicKey.encoded)
        if (!MessageDigest.isEqual(got, want)) {
            throw TlsException("the server's public key does not match the pin (got sha256/${Base64.getEncoder().encodeToString(got)})")
        }
    }

    companion object {
        /** The pin's 32 bytes from base64 (optionally `sha256/`-prefixed) or 64 hex digits. */
        @JvmStatic
        fun parsePin(text: String): ByteArray {
            val s = text.trim().removePrefix("sha256/")
            val bytes = if (s.length == 64 && s.all { it in "0123456789abcdefABCDEF" }) {
                ByteArray(32) { s.substring(2 * it, 2 * it + 2).toInt(16).toByte() }
            } else {
                try { Base64.getDecoder().decode(s) } catch (e: IllegalArgumentException) { ByteArray(0) }
            }
            if (bytes.size != 32) throw IllegalArgumentException("a pin is 32 bytes of SHA-256 (base64 or hex), got '$text'")
            return bytes
        }
    }
}
