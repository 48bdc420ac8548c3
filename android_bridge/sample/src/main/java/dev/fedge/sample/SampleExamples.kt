// NOT built in this repository (see ../../../../../../README.md).
package dev.fedge.sample

import android.content.Context
import dev.fedge.android.trainer.ArrayDataset
import java.io.DataInputStream
import java.io.File

/**
 * The app's own examples: here 8x8 handwritten digits the user drew, kept in the app's files as
 * `digits.bin` (count, then per example 64 float pixels in [0, 1] and its label). The data
 * never leaves the phone; only the model's update does.
 */
object SampleExamples {
    fun load(context: Context): ArrayDataset {
        val file = File(context.filesDir, "digits.bin")
        DataInputStream(file.inputStream().buffered()).use { input ->
            val n = input.readInt()
            val x = FloatArray(n * 64)
            val y = LongArray(n)
            for (i in 0 until n) {
                for (j in 0 until 64) x[i * 64 + j] = input.readFloat()
                y[i] = input.readInt().toLong()
            }
            return ArrayDataset.classification(x, 64, y)
        }
    }
}
