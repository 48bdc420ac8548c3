package dev.fedge.android.codec

import java.math.BigInteger

/**
 * numpy's `default_rng(seed).random()`: SeedSequence, PCG64 (XSL-RR 128/64) and the 53-bit
 * double, reimplemented so the Kotlin encoders reproduce the committed vectors byte for byte.
 * Test-only: devices draw fresh entropy ([Updates.randomUniform]).
 */
class NumpyPcg64(seed: Long) : UniformSource {
    private var state: BigInteger
    private val inc: BigInteger

    init {
        val words = seedSequenceState(seed, 8)
        fun u64(lo: Int, hi: Int) = BigInteger.valueOf(words[hi].toLong() and MASK32).shiftLeft(32).or(BigInteger.valueOf(words[lo].toLong() and MASK32))
        val s = u64(0, 1).shiftLeft(64).or(u64(2, 3))
        val i = u64(4, 5).shiftLeft(64).or(u64(6, 7))
        inc = i.shiftLeft(1).or(BigInteger.ONE).and(M128)
        state = BigInteger.ZERO
        step()
        state = state.add(s).and(M128)
        step()
    }

    private fun step() {
        state = state.multiply(MULT).add(inc).and(M128)
    }

    fun nextLong(): Long {
        step()
        val hi = state.shiftRight(64).toLong()
        val lo = state.toLong()
        val rot = state.shiftRight(122).toInt()
        return java.lang.Long.rotateRight(hi xor lo, rot)
    }

    override fun nextDouble(): Double = (nextLong() ushr 11) * (1.0 / 9007199254740992.0)

    companion object {
        private const val MASK32 = 0xFFFFFFFFL
        private val M128 = BigInteger.ONE.shiftLeft(128).subtract(BigInteger.ONE)
        private val MULT = BigInteger("2360ED051FC65DA44385DF649FCCF645", 16)

        /** numpy.random.SeedSequence(seed).generate_state(n // 2, uint64) as uint32 words. */
        fun seedSequenceState(seed: Long, nWords: Int): IntArray {
            require(seed >= 0)
            val entropy = if (seed == 0L) intArrayOf(0) else {
                val out = ArrayList<Int>()
                var v = seed
                while (v != 0L) { out.add((v and MASK32).toInt()); v = v ushr 32 }
                out.toIntArray()
            }
            var hashConst = 0x43b0d7e5
            fun hashmix(value: Int): Int {
                var v = value xor hashConst
                hashConst *= 0x931e8875.toInt()
                v *= hashConst
                return v xor (v ushr 16)
            }
            fun mix(x: Int, y: Int): Int {
                val r = 0xca01f9dd.toInt() * x - 0x4973f715 * y
                return r xor (r ushr 16)
            }
            val pool = IntArray(4) { hashmix(if (it < entropy.size) entropy[it] else 0) }
            for (src in 0 until 4) for (dst in 0 until 4) if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src]))
            for (src in 4 until entropy.size) for (dst in 0 until 4) pool[dst] = mix(pool[dst], hashmix(entropy[src]))
            var h = 0x8b51f9dd.toInt()
            return IntArray(nWords) {
                var d = pool[it % 4] xor h
                h *= 0x58f38ded
                d *= h
                d xor (d ushr 16)
            }
        }
    }
}
