//! Counter-based random numbers: value `i` of stream `(seed, stream)` depends on nothing else, so noise and jitter
//! are identical on any thread count and in any evaluation order.

/// SplitMix64 finaliser: a bijective 64-bit mix.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A keyed counter generator: `u64_at(i)` is a pure function of `(seed, stream, i)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRng {
    key: u64,
}

impl CounterRng {
    /// A stream for `seed`; different `stream` values give independent streams (noise vs jitter vs drop order).
    pub fn new(seed: u64, stream: u64) -> Self {
        CounterRng {
            key: splitmix64(seed ^ splitmix64(stream.wrapping_add(0xD1B5_4A32_D192_ED03))),
        }
    }

    /// The `i`-th 64-bit value.
    pub fn u64_at(&self, i: u64) -> u64 {
        splitmix64(self.key ^ splitmix64(i))
    }

    /// The `i`-th uniform in `[0, 1)` (53 bits).
    pub fn uniform_at(&self, i: u64) -> f64 {
        (self.u64_at(i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// The `i`-th standard normal (Box–Muller on uniforms `2i` and `2i + 1`).
    pub fn normal_at(&self, i: u64) -> f64 {
        let u1 = 1.0 - self.uniform_at(i.wrapping_mul(2)); // (0, 1]
        let u2 = self.uniform_at(i.wrapping_mul(2).wrapping_add(1));
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A sequential generator over a [`CounterRng`], for initialising parameters.
#[derive(Debug, Clone)]
pub struct SeqRng {
    rng: CounterRng,
    i: u64,
}

impl SeqRng {
    /// A sequence for `(seed, stream)`.
    pub fn new(seed: u64, stream: u64) -> Self {
        SeqRng {
            rng: CounterRng::new(seed, stream),
            i: 0,
        }
    }

    /// Next uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.i += 1;
        self.rng.uniform_at(self.i)
    }

    /// Next standard normal.
    pub fn normal(&mut self) -> f64 {
        self.i += 1;
        self.rng.normal_at(self.i)
    }

    /// Next integer in `0..n` (`n > 0`; returns 0 for `n = 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.i += 1;
        if n == 0 {
            0
        } else {
            self.rng.u64_at(self.i) % n
        }
    }

    /// A `[rows, cols]` matrix of `N(0, std²)` values.
    pub fn normal_matrix(&mut self, rows: usize, cols: usize, std: f32) -> ndarray::Array2<f32> {
        ndarray::Array2::from_shape_simple_fn((rows, cols), || self.normal() as f32 * std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_have_unit_moments() {
        let r = CounterRng::new(7, 1);
        let n = 200_000u64;
        let (mut s, mut s2) = (0.0, 0.0);
        for i in 0..n {
            let x = r.normal_at(i);
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn streams_differ_and_repeat() {
        let a = CounterRng::new(1, 0);
        let b = CounterRng::new(1, 1);
        assert_ne!(a.u64_at(5), b.u64_at(5));
        assert_eq!(a.u64_at(5), CounterRng::new(1, 0).u64_at(5));
    }
}
