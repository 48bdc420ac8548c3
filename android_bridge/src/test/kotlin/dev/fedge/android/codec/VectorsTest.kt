package dev.fedge.android.codec

import dev.fedge.android.frame.Frame
import dev.fedge.android.frame.FrameException
import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File

/**
 * The committed tests/vectors, the same ones the Python codecs are tested with: the Kotlin
 * encoder must produce each frame byte for byte (numpy's generator supplies the rounding draws),
 * the Kotlin decoder must read each back bit-exactly, and every `bad-*` frame must be refused
 * with the right error class.
 */
class VectorsTest {
    private val dir = File(System.getProperty("fedge.repo.root", ".."), "tests/vectors")

    private fun vectors(): List<JSONObject> {
        val files = dir.listFiles { f -> f.name.endsWith(".json") }?.sortedBy { it.name }.orEmpty()
        assertTrue("no vectors in $dir", files.size >= 20)
        return files.map { JSONObject(it.readText()) }
    }

    private fun floats(a: JSONArray) = FloatArray(a.length()) { a.getDouble(it).toFloat() }

    @Test
    fun everyGoodVectorEncodesToTheSameBytesAndDecodesBitExactly() {
        val good = vectors().filter { !it.has("error") }
        assertTrue(good.size >= 10)
        for (v in good) {
            val name = v.getString("name")
            val spec = CodecSpec.fromJson(v.getJSONObject("spec"))
            val input = floats(v.getJSONArray("input"))
            val expectedFrame = hex(v.getString("frame_hex"))
            // The reference encoder runs without error feedback even for top-k.
            val plain = spec.copy(errorFeedback = false)
            val encoded = Updates.encode(input, plain, NumpyPcg64(v.getLong("seed")))
            assertEquals(name, v.getString("frame_hex"), toHex(encoded.frame))
            val decoded = Updates.decode(expectedFrame)
            val want = floats(v.getJSONArray("decoded"))
            assertArrayEquals(name, want.map { it.toRawBits() }.toIntArray(), decoded.map { it.toRawBits() }.toIntArray())
        }
    }

    @Test
    fun everyBadVectorIsRefusedWithItsErrorClass() {
        val bad = vectors().filter { it.has("error") }
        assertTrue(bad.size >= 15)
        for (v in bad) {
            val name = v.getString("name")
            try {
                Updates.decode(hex(v.getString("frame_hex")))
                fail("$name was accepted")
            } catch (e: FrameException) {
                assertEquals(name, "malformed_frame", v.getString("error"))
            } catch (e: UpdateException) {
                assertEquals(name, "bad_update", v.getString("error"))
            }
        }
    }

    @Test
    fun docsExampleRawFrame() {
        val frame = Frame.encodeFloats(floatArrayOf(0f, 1f, 2f, 3f, 4f, 5f), longArrayOf(2, 3))
        assertEquals(52, frame.size)
        assertEquals("d348f7e2", toHex(frame.copyOfRange(48, 52)))
    }

    companion object {
        fun hex(s: String) = ByteArray(s.length / 2) { s.substring(2 * it, 2 * it + 2).toInt(16).toByte() }

        fun toHex(b: ByteArray) = b.joinToString("") { "%02x".format(it.toInt() and 0xff) }
    }
}
