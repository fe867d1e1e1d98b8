//! Kendall's τ-b (or τ-c) with ties, in O(n log n) (Knight 1966), and its p-value — the
//! numbers of `scipy.stats.kendalltau(x, y, method=…, variant=…, alternative=…)`
//! (FORMULAS.md, "Value ranking"). `Method::Auto` (scipy's default) takes the exact null
//! distribution when neither variable has ties and n ≤ 33 or at most one pair is discordant
//! (or concordant), the asymptotic normal approximation otherwise (`exact_pvalue`).
//!
//! τ_b = (n_c − n_d) / sqrt((n_0 − n_1)(n_0 − n_2)), n_0 = n(n−1)/2, n_1 and n_2 the
//! pairs tied in x and in y. Two ways to the same counts, by input:
//! - **few distinct values in both** (≤ `SMALL_DISTINCT` each, ≤ `TABLE_MAX` cells):
//!   dense ranks from a small hash table (no sort), one pass into a contingency table
//!   (per thread), then every count from the table in O(m_x·m_y).
//! - **otherwise, through ranks** (one pair: both variables at once; a matrix, whose rows
//!   are variables: each row once). A variable is ranked by sorting `coarse << 32 | index`
//!   records with an LSD radix sort (the 32-bit coarse key is a monotone, linear map of
//!   the value), then putting each run of equal coarse keys in exact order by value;
//!   that gives dense ranks, the rank order and the tie counts. A pair lays y's ranks out
//!   in x's rank order, sorts them within groups of tied x (those pairs are not
//!   discordant), makes them unique in order of appearance (tied y are not discordant
//!   either), and counts the inversions of that permutation by binary MSD radix
//!   partitions, depth first (a group stays in cache until done), 16 values at a time
//!   with AVX-512 where the CPU has it (branch-free scalar code otherwise), small groups
//!   in one pass over a bitmap. Large groups, the two variables of a pair and the pairs
//!   of a matrix run in parallel (rayon).
//!
//! Edge cases, as scipy: fewer than two observations or a constant variable give
//! (NaN, NaN); a NaN anywhere gives (NaN, NaN) (scipy's default `nan_policy="propagate"`);
//! −0.0 ties with 0.0; `Method::Exact` on data with ties is an error. One deviation: for
//! n = 2 scipy's asymptotic branch (`Method::Asymptotic`; auto takes the exact one) divides
//! 0 by 0 (a Python `ZeroDivisionError`); that variance term, x₀·y₀/(9m(n−2)), has
//! x₀ = Σ c(c−1)(c−2) = 0 for every n = 2 input, and is taken as zero here.
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::{CoreError, Result};

/// τ-b and its two-sided p-value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KendallTau {
    pub tau: f64,
    pub pvalue: f64,
}

impl KendallTau {
    const NAN: KendallTau = KendallTau { tau: f64::NAN, pvalue: f64::NAN };
}

/// How the p-value is computed (scipy's `method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// Exact without ties when n ≤ 33 or min(discordant, concordant) ≤ 1; else asymptotic.
    #[default]
    Auto,
    Asymptotic,
    /// The exact null distribution; data with ties is an error.
    Exact,
}

/// τ-b (ties in the normalisation) or Stuart's τ-c (scipy's `variant`); same p-value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    #[default]
    B,
    C,
}

/// The alternative hypothesis (scipy's `alternative`): τ ≠ 0, τ < 0, τ > 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Alternative {
    #[default]
    TwoSided,
    Less,
    Greater,
}

/// What to compute; the default is scipy's default (auto, τ-b, two-sided).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub method: Method,
    pub variant: Variant,
    pub alternative: Alternative,
}

/// At most this many distinct values make a variable "small" (hash-ranked).
const SMALL_DISTINCT: usize = 1 << 10;
/// Largest contingency table (cells) the few-values path builds.
const TABLE_MAX: usize = 1 << 18;
/// Work below this many observations is not split across threads.
const PAR_CUTOFF: usize = 1 << 15;

/// τ and p-value of two equally long samples.
pub fn kendall_tau(x: &[f64], y: &[f64], opts: Options) -> Result<KendallTau> {
    if x.len() != y.len() {
        return Err(CoreError::Input(format!(
            "kendall_tau: x and y must have the same length, got {} and {}",
            x.len(),
            y.len()
        )));
    }
    check_len(x.len())?;
    if has_nan(x) || has_nan(y) {
        return Ok(KendallTau::NAN);
    }
    // Small inputs stay on this thread: waking the pool costs more than the work.
    let (sx, sy) = if x.len() > PAR_CUTOFF {
        rayon::join(|| SmallRanks::new(x), || SmallRanks::new(y))
    } else {
        (SmallRanks::new(x), SmallRanks::new(y))
    };
    if let (Some(a), Some(b)) = (&sx, &sy) {
        if a.distinct() * b.distinct() <= TABLE_MAX {
            let c = table_counts(&a.ranks, a.distinct(), &b.ranks, b.distinct());
            return finish(x.len(), a.ties(), b.ties(), c, opts);
        }
    }
    let rank = |s: Option<SmallRanks>, v: &[f64]| s.map_or_else(|| Ranked::sorted(v), Ranked::from_small);
    let (a, b) = if x.len() > PAR_CUTOFF {
        rayon::join(|| rank(sx, x), || rank(sy, y))
    } else {
        (rank(sx, x), rank(sy, y))
    };
    finish(x.len(), a.ties, b.ties, ranked_counts(&a, &b), opts)
}

/// τ and p-value for every pair of rows of a row-major `[n_vars, n_obs]` matrix
/// (rows are variables). Returns two row-major `[n_vars, n_vars]` symmetric matrices.
pub fn kendall_tau_matrix(data: &[f64], n_vars: usize, n_obs: usize, opts: Options) -> Result<(Vec<f64>, Vec<f64>)> {
    if n_vars.checked_mul(n_obs) != Some(data.len()) {
        return Err(CoreError::Input(format!(
            "kendall_tau_matrix: {} values do not make a [{n_vars}, {n_obs}] matrix",
            data.len()
        )));
    }
    check_len(n_obs)?;
    let rows: Vec<Option<Ranked>> = (0..n_vars)
        .into_par_iter()
        .map(|i| {
            let row = &data[i * n_obs..(i + 1) * n_obs];
            (!has_nan(row)).then(|| Ranked::new(row))
        })
        .collect();
    let pairs: Vec<(usize, usize)> = (0..n_vars).flat_map(|i| (i..n_vars).map(move |j| (i, j))).collect();
    let results: Vec<KendallTau> = pairs
        .par_iter()
        .map(|&(i, j)| match (&rows[i], &rows[j]) {
            (Some(a), Some(b)) => finish(n_obs, a.ties, b.ties, ranked_counts(a, b), opts),
            _ => Ok(KendallTau::NAN),
        })
        .collect::<Result<_>>()?;
    let mut tau = vec![f64::NAN; n_vars * n_vars];
    let mut p = vec![f64::NAN; n_vars * n_vars];
    for (&(i, j), r) in pairs.iter().zip(&results) {
        for (a, b) in [(i, j), (j, i)] {
            tau[a * n_vars + b] = r.tau;
            p[a * n_vars + b] = r.pvalue;
        }
    }
    Ok((tau, p))
}

fn check_len(n: usize) -> Result<()> {
    // Ranks and indices are u32 to halve memory traffic.
    if n >= u32::MAX as usize {
        return Err(CoreError::Input(format!("kendall_tau: fewer than {} observations please, got {n}", u32::MAX)));
    }
    Ok(())
}

fn has_nan(v: &[f64]) -> bool {
    v.iter().any(|x| x.is_nan())
}

/// A u64 whose unsigned order is the numeric order of non-NaN `v` (−0.0 == 0.0).
/// Never `u64::MAX` (that would be a NaN), which the hash table uses as "empty".
fn order_key(v: f64) -> u64 {
    let bits = if v == 0.0 { 0u64 } else { v.to_bits() };
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

// ------------------------------------------------------------------ counts and the result

/// Tie statistics of one variable, as scipy's `count_rank_tie` computes them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Ties {
    /// Σ c(c−1)/2 over groups of c equal values: pairs tied in this variable.
    pairs: u64,
    /// Σ c(c−1)(c−2) (in f64, as scipy).
    v0: f64,
    /// Σ c(c−1)(2c+5) (in f64, as scipy).
    v1: f64,
    /// Number of groups: distinct values (τ-c).
    groups: u64,
}

impl Ties {
    fn add_group(&mut self, c: u64) {
        let cf = c as f64;
        self.groups += 1;
        self.pairs += c * c.saturating_sub(1) / 2;
        self.v0 += cf * (cf - 1.0) * (cf - 2.0);
        self.v1 += cf * (cf - 1.0) * (2.0 * cf + 5.0);
    }

    /// From the lengths of the runs of equal values in a sorted sequence.
    fn of_sorted<T: PartialEq>(s: &[T]) -> Ties {
        let mut t = Ties::default();
        let mut run = 0u64;
        for (k, v) in s.iter().enumerate() {
            if k > 0 && *v != s[k - 1] {
                t.add_group(run);
                run = 0;
            }
            run += 1;
        }
        if run > 0 {
            t.add_group(run);
        }
        t
    }
}

/// Discordant pairs and pairs tied in both variables.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PairCounts {
    discordant: u64,
    joint_ties: u64,
}

/// τ and p-value from the counts, with scipy's arithmetic in scipy's order.
fn finish(n: usize, xt: Ties, yt: Ties, c: PairCounts, opts: Options) -> Result<KendallTau> {
    let n = n as u64;
    let tot = n * n.saturating_sub(1) / 2;
    if xt.pairs == tot || yt.pairs == tot {
        return Ok(KendallTau::NAN); // n < 2, or a constant variable
    }
    let con_minus_dis =
        tot as i128 - xt.pairs as i128 - yt.pairs as i128 + c.joint_ties as i128 - 2 * c.discordant as i128;
    let cmd = con_minus_dis as f64;
    let tau = match opts.variant {
        Variant::B => cmd / ((tot - xt.pairs) as f64).sqrt() / ((tot - yt.pairs) as f64).sqrt(),
        Variant::C => {
            // 2(P − Q) / (n²(m − 1)/m), m the fewer distinct values of the two
            let m = xt.groups.min(yt.groups);
            2.0 * cmd / ((n as u128 * n as u128 * (m - 1) as u128) as f64 / m as f64)
        }
    }
    .clamp(-1.0, 1.0);
    let no_ties = xt.pairs == 0 && yt.pairs == 0;
    let exact = match opts.method {
        Method::Exact if !no_ties => {
            return Err(CoreError::Input(
                "kendall_tau: ties found, the exact method cannot be used (use method \"auto\" or \"asymptotic\")".into(),
            ))
        }
        Method::Exact => true,
        Method::Auto => no_ties && (n <= 33 || c.discordant.min(tot - c.discordant) <= 1),
        Method::Asymptotic => false,
    };
    if exact {
        return Ok(KendallTau { tau, pvalue: exact_pvalue(n, tot - c.discordant, opts.alternative)? });
    }
    let nf = n as f64;
    let m = nf * (nf - 1.0);
    let xy_pairs = 2u128
        .checked_mul(xt.pairs as u128)
        .and_then(|v| v.checked_mul(yt.pairs as u128))
        .map(|v| v as f64)
        .unwrap_or(2.0 * xt.pairs as f64 * yt.pairs as f64);
    let v0 = xt.v0 * yt.v0;
    let third = if v0 == 0.0 { 0.0 } else { v0 / (9.0 * m * (nf - 2.0)) };
    let var = (m * (2.0 * nf + 5.0) - xt.v1 - yt.v1) / 18.0 + xy_pairs / m + third;
    let z = cmd / var.sqrt();
    let pvalue = match opts.alternative {
        Alternative::TwoSided => erfc(z.abs() * std::f64::consts::FRAC_1_SQRT_2),
        Alternative::Less => ndtr(z),
        Alternative::Greater => ndtr(-z),
    };
    Ok(KendallTau { tau, pvalue })
}

// ------------------------------------------------------------------ the exact null distribution

/// The exact p-value of `c` concordant pairs among n observations without ties, as scipy's
/// `_mstats_basic._kendall_p_exact` computes it (Kendall 1970): the counts of permutations
/// of n with k inversions (k ≤ c, the nearer tail; the distribution is symmetric) by the
/// recurrence M(j, k) = Σ_{i<j} M(j−1, k−i) — a running sum less the sum j back — in
/// float64, summed as numpy sums (pairwise) and divided by n! (for n ≥ 171, where n!
/// overflows, each step is divided by j instead). O(n·c) time, c ≤ n(n−1)/4, and c + 1
/// floats: more than `EXACT_MAX_C` is an error (scipy would run out of memory there).
pub fn exact_pvalue(n: u64, concordant: u64, alternative: Alternative) -> Result<f64> {
    let tot = n * n.saturating_sub(1) / 2;
    let in_right_tail = concordant >= tot - concordant.min(tot);
    let c = concordant.min(tot - concordant.min(tot));
    if c > EXACT_MAX_C {
        return Err(CoreError::Input(format!(
            "kendall_tau: the exact method at n = {n} needs {c} terms of the null distribution (at most \
             {EXACT_MAX_C}); use method \"auto\" or \"asymptotic\""
        )));
    }
    let (mut prob, p_mass_at_c);
    if n <= 1 {
        (prob, p_mass_at_c) = (1.0, 1.0);
    } else if n == 2 {
        (prob, p_mass_at_c) = (1.0, 0.5);
    } else if c == 0 {
        prob = if n < 171 { 2.0 / factorial(n) } else { 0.0 };
        p_mass_at_c = prob / 2.0;
    } else if c == 1 {
        prob = if n < 172 { 2.0 / factorial(n - 1) } else { 0.0 };
        p_mass_at_c = (n - 1) as f64 / factorial(n);
    } else if 4 * c == n * (n - 1) && alternative == Alternative::TwoSided {
        (prob, p_mass_at_c) = (1.0, f64::NAN); // the middle of the distribution; not needed
    } else {
        let c = c as usize;
        let mut new = vec![0.0f64; c + 1];
        new[0] = 1.0;
        new[1] = 1.0;
        for j in 3..=n as usize {
            let mut run = 0.0;
            for v in new.iter_mut() {
                run += *v;
                *v = if n < 171 { run } else { run / j as f64 };
            }
            // new[j:] -= new[:c+1-j] (numpy reads the right side before writing: descend)
            for k in (j..=c).rev() {
                new[k] -= new[k - j];
            }
        }
        if n < 171 {
            let f = factorial(n);
            prob = 2.0 * pairwise_sum(&new) / f;
            p_mass_at_c = new[c] / f;
        } else {
            prob = pairwise_sum(&new);
            p_mass_at_c = new[c] / 2.0;
        }
    }
    if alternative != Alternative::TwoSided {
        // the one-sided p-value is half the two-sided one when c lies on the side the
        // alternative predicts; otherwise the complement, with the mass at c added back
        if in_right_tail == (alternative == Alternative::Greater) {
            prob /= 2.0;
        } else {
            prob = 1.0 - prob / 2.0 + p_mass_at_c;
        }
    }
    Ok(prob.clamp(0.0, 1.0))
}

/// Most terms of the exact null distribution `exact_pvalue` computes (1 GiB of f64; n ≈ 23,000).
pub const EXACT_MAX_C: u64 = 1 << 27;

/// n! rounded to the nearest f64 (ties to even), as Python's `float(math.factorial(n))`;
/// infinite from 171 on. Exact in base-2⁶⁴ limbs, rounded once.
fn factorial(n: u64) -> f64 {
    let mut limbs: Vec<u64> = vec![1]; // little-endian
    for k in 2..=n {
        let mut carry = 0u128;
        for l in limbs.iter_mut() {
            let v = u128::from(*l) * u128::from(k) + carry;
            *l = v as u64;
            carry = v >> 64;
        }
        if carry > 0 {
            limbs.push(carry as u64);
        }
    }
    let top = limbs.len() - 1;
    if top == 0 {
        return limbs[0] as f64; // `as` rounds to nearest, ties to even
    }
    let (hi, next) = (limbs[top], limbs[top - 1]);
    let lz = hi.leading_zeros();
    let bits = 64 * top as i32 + (64 - lz as i32);
    // the 64 leading bits, and whether any bit below them is set
    let lead = if lz == 0 { hi } else { (hi << lz) | (next >> (64 - lz)) };
    let below = if lz == 0 { next } else { next << lz };
    let sticky = below != 0 || limbs[..top - 1].iter().any(|&l| l != 0);
    let mut mant = lead >> 11;
    let rest = lead & 0x7ff;
    if rest > 0x400 || (rest == 0x400 && (sticky || mant & 1 == 1)) {
        mant += 1; // 2⁵³ at most: still exact
    }
    let e = bits - 53;
    if e > 1023 {
        return f64::INFINITY;
    }
    mant as f64 * f64::from_bits(((1023 + e) as u64) << 52)
}

/// Σ v as numpy's `np.sum` adds a contiguous float64 array (pairwise, 8 accumulators in
/// blocks of up to 128), so that the exact p-value is scipy's to the last bit.
fn pairwise_sum(v: &[f64]) -> f64 {
    let n = v.len();
    if n < 8 {
        return v.iter().fold(0.0, |s, &x| s + x);
    }
    if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&v[..8]);
        let full = n - n % 8;
        for chunk in v[8..full].chunks_exact(8) {
            for (a, &b) in r.iter_mut().zip(chunk) {
                *a += b;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &v[full..] {
            res += x;
        }
        return res;
    }
    let mut half = n / 2;
    half -= half % 8;
    pairwise_sum(&v[..half]) + pairwise_sum(&v[half..])
}

// ------------------------------------------------------------------ few distinct values

/// Dense ranks of a variable with at most `SMALL_DISTINCT` distinct values.
struct SmallRanks {
    ranks: Vec<u32>,
    /// Observations per rank.
    counts: Vec<u64>,
}

impl SmallRanks {
    /// `None` as soon as a `SMALL_DISTINCT + 1`-th distinct value shows up.
    fn new(values: &[f64]) -> Option<SmallRanks> {
        const SLOTS: usize = SMALL_DISTINCT * 4;
        const SHIFT: u32 = 64 - SLOTS.trailing_zeros();
        let mut slot_key = vec![u64::MAX; SLOTS];
        let mut slot_id = vec![0u32; SLOTS];
        let mut uniq: Vec<u64> = Vec::new();
        let mut ids = vec![0u32; values.len()];
        for (id, &v) in ids.iter_mut().zip(values) {
            let k = order_key(v);
            let mut h = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> SHIFT) as usize;
            loop {
                if slot_key[h] == k {
                    *id = slot_id[h];
                    break;
                }
                if slot_key[h] == u64::MAX {
                    if uniq.len() == SMALL_DISTINCT {
                        return None;
                    }
                    slot_key[h] = k;
                    slot_id[h] = uniq.len() as u32;
                    *id = uniq.len() as u32;
                    uniq.push(k);
                    break;
                }
                h = (h + 1) & (SLOTS - 1);
            }
        }
        // first-seen ids -> dense ranks
        let mut by_key: Vec<u32> = (0..uniq.len() as u32).collect();
        by_key.sort_unstable_by_key(|&i| uniq[i as usize]);
        let mut rank_of = vec![0u32; uniq.len()];
        for (r, &i) in by_key.iter().enumerate() {
            rank_of[i as usize] = r as u32;
        }
        let mut counts = vec![0u64; uniq.len()];
        for id in ids.iter_mut() {
            *id = rank_of[*id as usize];
            counts[*id as usize] += 1;
        }
        Some(SmallRanks { ranks: ids, counts })
    }

    fn distinct(&self) -> usize {
        self.counts.len()
    }

    fn ties(&self) -> Ties {
        let mut t = Ties::default();
        for &c in &self.counts {
            t.add_group(c);
        }
        t
    }
}

/// Discordant and jointly tied pairs from the contingency table of two rank vectors
/// (ranks `< ma` and `< mb`): one pass over the data, then O(ma·mb).
fn table_counts(ra: &[u32], ma: usize, rb: &[u32], mb: usize) -> PairCounts {
    let cells = ma * mb;
    let chunk = (ra.len() / (2 * rayon::current_num_threads()).max(1)).max(PAR_CUTOFF);
    let table: Vec<u64> = ra
        .par_chunks(chunk)
        .zip(rb.par_chunks(chunk))
        .map(|(a, b)| {
            let mut t = vec![0u64; cells];
            for (&i, &j) in a.iter().zip(b) {
                t[i as usize * mb + j as usize] += 1;
            }
            t
        })
        .reduce(
            || vec![0u64; cells],
            |mut s, t| {
                s.iter_mut().zip(&t).for_each(|(u, v)| *u += v);
                s
            },
        );
    let mut joint_ties = 0u64;
    let mut discordant = 0u64;
    let mut above = vec![0u64; mb]; // observations in earlier rows (smaller a), per column
    for row in table.chunks(mb.max(1)).take(ma) {
        // pairs (earlier row, this row) with b strictly greater earlier: discordant
        let mut greater = 0u64; // earlier observations with column > j
        for j in (0..mb).rev() {
            discordant += row[j] * greater;
            greater += above[j];
        }
        for (u, &c) in above.iter_mut().zip(row) {
            *u += c;
            joint_ties += c * c.saturating_sub(1) / 2;
        }
    }
    PairCounts { discordant, joint_ties }
}

// ------------------------------------------------------------------ ranks

/// One variable ranked: dense ranks, the observations in rank order, and ties.
struct Ranked {
    /// Dense rank (0-based) of each observation; built when first needed (a pair needs
    /// one variable's ranks and the other's order; each is a random scatter of the other).
    ranks: OnceLock<Vec<u32>>,
    /// `starts[r]` = position in `order` of the first observation of rank r; ends with n.
    starts: Vec<u32>,
    ties: Ties,
    /// Observation indices sorted by rank (ties in index order); built when first needed.
    order: OnceLock<Vec<u32>>,
}

impl Ranked {
    fn new(values: &[f64]) -> Ranked {
        match SmallRanks::new(values) {
            Some(s) => Ranked::from_small(s),
            None => Ranked::sorted(values),
        }
    }

    fn from_small(s: SmallRanks) -> Ranked {
        let mut starts = Vec::with_capacity(s.distinct() + 1);
        let mut acc = 0u32;
        for &c in &s.counts {
            starts.push(acc);
            acc += c as u32;
        }
        starts.push(acc);
        Ranked { ties: s.ties(), ranks: OnceLock::from(s.ranks), starts, order: OnceLock::new() }
    }

    /// By sorting: any number of distinct values. The observations are sorted by a
    /// coarse 32-bit key (`coarse_sort`), then each run of equal coarse keys (values
    /// closer than the key's resolution, or equal) is put in exact order by value.
    fn sorted(values: &[f64]) -> Ranked {
        let n = values.len();
        let packed = coarse_sort(values);
        let mut order = Vec::with_capacity(n);
        let mut starts = Vec::new();
        let mut ties = Ties::default();
        let mut run: Vec<(u64, u32)> = Vec::new();
        let mut k = 0;
        while k < n {
            let coarse = packed[k] >> 32;
            let mut end = k + 1;
            while end < n && packed[end] >> 32 == coarse {
                end += 1;
            }
            if end == k + 1 {
                // a coarse key of its own: a value of its own
                open_rank(&mut starts, &mut ties, order.len());
                order.push(packed[k] as u32);
                k = end;
                continue;
            }
            run.clear();
            run.extend(packed[k..end].iter().map(|&p| (order_key(values[p as u32 as usize]), p as u32)));
            if !run.is_sorted() {
                run.sort_unstable(); // by value, then index
            }
            for (j, &(key, i)) in run.iter().enumerate() {
                if j == 0 || key != run[j - 1].0 {
                    open_rank(&mut starts, &mut ties, order.len());
                }
                order.push(i);
            }
            k = end;
        }
        open_rank(&mut starts, &mut ties, n); // closes the last group; `starts` ends with n
        Ranked { ranks: OnceLock::new(), starts, ties, order: OnceLock::from(order) }
    }

    fn distinct(&self) -> usize {
        self.starts.len() - 1
    }

    fn ranks(&self) -> &[u32] {
        self.ranks.get_or_init(|| {
            let order = self.order.get().expect("a Ranked has its ranks or its order");
            let mut ranks = vec![0u32; order.len()];
            for (r, g) in self.starts.windows(2).enumerate() {
                for &i in &order[g[0] as usize..g[1] as usize] {
                    ranks[i as usize] = r as u32;
                }
            }
            ranks
        })
    }

    fn order(&self) -> &[u32] {
        self.order.get_or_init(|| {
            // stable counting sort by rank
            let ranks = self.ranks.get().expect("a Ranked has its ranks or its order");
            let mut next = self.starts[..self.distinct()].to_vec();
            let mut order = vec![0u32; ranks.len()];
            for (i, &r) in ranks.iter().enumerate() {
                order[next[r as usize] as usize] = i as u32;
                next[r as usize] += 1;
            }
            order
        })
    }
}

/// Bits per digit of the radix sort: 256 buckets, whose write positions stay in L1.
const DIGIT_BITS: u32 = 8;
const DIGITS: usize = (u32::BITS / DIGIT_BITS) as usize;

/// A new rank starts at position `at` of the rank order: the previous rank's group closes.
fn open_rank(starts: &mut Vec<u32>, ties: &mut Ties, at: usize) {
    let at = at as u32;
    if let Some(&last) = starts.last() {
        ties.add_group(u64::from(at - last));
    }
    starts.push(at);
}

/// `coarse << 32 | index` for every observation, sorted (so by coarse key, then index).
/// The coarse key is a non-decreasing function of the value: −∞ → 0, +∞ → 2³²−1, finite
/// values linearly onto [1, 2³²−2] between the finite minimum and maximum (every step a
/// correctly rounded, so monotone, float operation). Equal values get equal keys, close
/// values may share one. Sorted by a stable LSD radix sort of 8-byte records on the key
/// (four passes of 8 bits, one pass making all histograms, a digit on which all keys
/// agree skipped), which keeps index order within a key. (An MSD radix sort, buckets
/// finished in cache, measured slower here: too many small buckets.)
fn coarse_sort(values: &[f64]) -> Vec<u64> {
    let n = values.len();
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    const TOP: f64 = (u32::MAX - 2) as f64;
    // halves: hi − lo may overflow, hi/2 − lo/2 does not
    let scale = if hi > lo { TOP / (hi * 0.5 - lo * 0.5) } else { 0.0 };
    let coarse = |v: f64| -> u32 {
        if v.is_finite() {
            // NaN (0·∞ from a huge scale) → TOP by `min`: still one key for the lot
            ((v * 0.5 - lo * 0.5) * scale).min(TOP) as u32 + 1
        } else if v > 0.0 {
            u32::MAX
        } else {
            0
        }
    };
    let mut hist = [[0u32; 1 << DIGIT_BITS]; DIGITS];
    let mut records: Vec<u64> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = coarse(v);
            for (d, h) in hist.iter_mut().enumerate() {
                h[digit(c, d)] += 1;
            }
            u64::from(c) << 32 | i as u64
        })
        .collect();
    let mut buf = vec![0u64; n];
    for (d, h) in hist.iter().enumerate() {
        if h.iter().any(|&c| c as usize == n) {
            continue;
        }
        let mut next = [0u32; 1 << DIGIT_BITS];
        let mut acc = 0u32;
        for (s, &c) in next.iter_mut().zip(h) {
            *s = acc;
            acc += c;
        }
        for &r in &records {
            let b = digit((r >> 32) as u32, d);
            let at = next[b] as usize; // < n: the histogram counted this key
            next[b] += 1;
            buf[at] = r;
        }
        std::mem::swap(&mut records, &mut buf);
    }
    records
}

#[inline(always)]
fn digit(k: u32, d: usize) -> usize {
    ((k >> (d as u32 * DIGIT_BITS)) & ((1 << DIGIT_BITS) - 1)) as usize
}

// ------------------------------------------------------------------ a pair from ranks

/// Pair counts of two ranked variables.
fn ranked_counts(x: &Ranked, y: &Ranked) -> PairCounts {
    if std::ptr::eq(x, y) {
        return PairCounts { discordant: 0, joint_ties: x.ties.pairs };
    }
    if x.distinct() <= SMALL_DISTINCT && y.distinct() <= SMALL_DISTINCT && x.distinct() * y.distinct() <= TABLE_MAX {
        return table_counts(x.ranks(), x.distinct(), y.ranks(), y.distinct());
    }
    // Both counts are symmetric in (x, y): lay out along the one with fewer ties.
    let (a, b) = if x.ties.pairs <= y.ties.pairs { (x, y) } else { (y, x) };
    let (order, ranks) = (a.order(), b.ranks());
    let mut seq: Vec<u32> = if order.len() > PAR_CUTOFF {
        order.par_iter().map(|&i| ranks[i as usize]).collect()
    } else {
        order.iter().map(|&i| ranks[i as usize]).collect()
    };
    let mut joint_ties = 0u64;
    if a.ties.pairs > 0 {
        for g in a.starts.windows(2) {
            let group = &mut seq[g[0] as usize..g[1] as usize];
            if group.len() > 1 {
                group.sort_unstable();
                joint_ties += Ties::of_sorted(group).pairs;
            }
        }
    }
    if b.ties.pairs > 0 {
        // Equal y get increasing unique ranks in order of appearance: never an inversion.
        let mut next = b.starts[..b.distinct()].to_vec();
        for v in seq.iter_mut() {
            let u = next[*v as usize];
            next[*v as usize] += 1;
            *v = u;
        }
    }
    PairCounts { discordant: permutation_inversions(seq), joint_ties }
}

// ------------------------------------------------------------------ inversions

/// The partition kernels: AVX-512 where the CPU has it, else portable scalar code.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("popcnt") {
            return Kernel::Avx512;
        }
        Kernel::Scalar
    }

    /// Groups of at most 2^this many values are counted by `blocked_inversions`: with
    /// scalar partitions (~3 cycles per value and bit) early, with vector ones (a small
    /// fraction of that) only at one 64-bit word.
    fn blocked_bits(self) -> u32 {
        match self {
            Kernel::Scalar => BLOCKED_BITS,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => 6,
        }
    }
}

/// At most this many bits of values per `blocked_inversions` call (its bitmap's size).
const BLOCKED_BITS: u32 = 12;

/// Inversions #{i < j : p[i] > p[j]} of a permutation `p` of 0..n.
fn permutation_inversions(p: Vec<u32>) -> u64 {
    permutation_inversions_with(p, Kernel::detect())
}

fn permutation_inversions_with(mut p: Vec<u32>, kernel: Kernel) -> u64 {
    let n = p.len();
    if n < 2 {
        return 0;
    }
    let mut scratch = vec![0u32; n];
    let bits = u32::BITS - ((n - 1) as u32).leading_zeros();
    msd_inversions(&mut p, &mut scratch, bits, kernel)
}

/// Inversions of `src`, which holds a permutation of [base, base + len) with `base` a
/// multiple of 2^`bits` and len ≤ 2^`bits` (so the values differ in the low `bits` bits
/// only); `scratch` is as long, its content ignored; `src` is left in any order.
///
/// Binary MSD radix partitions, depth first: the values with the top bit clear go,
/// stably, to the front of `scratch` (exactly 2^(bits−1) of them: their places are
/// known), the others to the back; every pair (set, clear) in that order is an inversion
/// across the halves, counted in the same pass; then each half, whose values are again
/// such a range, recursively (in parallel when large). Once a group fits in cache it
/// stays there until it is done; small groups finish in one `blocked_inversions` pass.
fn msd_inversions(src: &mut [u32], scratch: &mut [u32], mut bits: u32, kernel: Kernel) -> u64 {
    let len = src.len();
    debug_assert!(len == scratch.len() && len <= 1 << bits);
    loop {
        if bits <= kernel.blocked_bits() {
            return blocked_inversions(src, bits);
        }
        if len > 1 << (bits - 1) {
            break;
        }
        bits -= 1; // every value has the top bit clear: nothing to partition
    }
    let bit = bits - 1;
    let inv = match kernel {
        Kernel::Scalar => partition_count(src, scratch, bit),
        // SAFETY: `Kernel::detect` found AVX-512F and POPCNT on this CPU.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { partition_count_avx512(src, scratch, bit) },
    };
    let (lo, hi) = scratch.split_at_mut(1 << bit);
    let (lo_scratch, hi_scratch) = src.split_at_mut(1 << bit);
    let (a, b) = if len > PAR_CUTOFF {
        rayon::join(|| msd_inversions(lo, lo_scratch, bit, kernel), || msd_inversions(hi, hi_scratch, bit, kernel))
    } else {
        (msd_inversions(lo, lo_scratch, bit, kernel), msd_inversions(hi, hi_scratch, bit, kernel))
    };
    inv + a + b
}

/// Values with `bit` clear to the front of `dst`, those with it set to the back from
/// position 2^bit (both stable; `src` holds exactly 2^bit values with the bit clear),
/// returning the pairs (set before clear). Branch-free.
fn partition_count(src: &[u32], dst: &mut [u32], bit: u32) -> u64 {
    assert_eq!(src.len(), dst.len());
    partition_tail(src, dst, bit, 0, 0)
}

/// `partition_count` from position `start` of `src` on, `set` values with the bit set
/// having come before it.
fn partition_tail(src: &[u32], dst: &mut [u32], bit: u32, start: usize, mut set: usize) -> u64 {
    let half = 1usize << bit;
    let mut inv = 0u64;
    for (i, &v) in src.iter().enumerate().skip(start) {
        let b = ((v >> bit) & 1) as usize;
        // i − set: the clear values before this one, half + set: the set ones.
        let at = if b == 1 { half + set } else { i - set };
        dst[at] = v;
        // a clear value is passed over by every set value before it
        inv += (set & b.wrapping_sub(1)) as u64;
        set += b;
    }
    inv
}

/// `partition_count` 16 values at a time: a mask of the values with the bit set, each
/// side compressed (`vpcompressd`) and written with a masked store at its cursor. The
/// pairs (set, clear) within a vector of 16: for its c clear lanes at lane indices j,
/// Σ j − c(c−1)/2 (each clear lane's set lanes before it); Σ j from four popcounts.
///
/// # Safety
/// The CPU must have AVX-512F and POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn partition_count_avx512(src: &[u32], dst: &mut [u32], bit: u32) -> u64 {
    use std::arch::x86_64::*;
    let n = src.len();
    assert_eq!(n, dst.len());
    let half = 1usize << bit;
    assert!(half <= n);
    let probe = _mm512_set1_epi32(1 << bit);
    let (mut lo, mut hi) = (0usize, half); // next clear, next set slot
    let mut inv = 0u64;
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n = src.len(): 16 values to read.
        let v = unsafe { _mm512_loadu_si512(src.as_ptr().add(i).cast()) };
        let set: __mmask16 = _mm512_test_epi32_mask(v, probe);
        let clear = !set;
        let c = clear.count_ones() as usize;
        // A bad input (not 2^bit clear values) must not write out of bounds.
        assert!(lo + c <= half && hi + (16 - c) <= n, "partition_count_avx512: not a permutation");
        let lane_sum = (clear & 0xAAAA).count_ones()
            + 2 * (clear & 0xCCCC).count_ones()
            + 4 * (clear & 0xF0F0).count_ones()
            + 8 * (clear & 0xFF00).count_ones();
        inv += (c * (hi - half)) as u64 + u64::from(lane_sum) - (c * c.saturating_sub(1) / 2) as u64;
        // SAFETY: the masked stores write c lanes at dst[lo..lo + c] (lo + c ≤ half ≤ n)
        // and 16 − c lanes at dst[hi..hi + 16 − c] (≤ n), checked above; masked-off
        // lanes are neither written nor faulted.
        unsafe {
            let to_lo = _mm512_maskz_compress_epi32(clear, v);
            let to_hi = _mm512_maskz_compress_epi32(set, v);
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(lo).cast(), ((1u32 << c) - 1) as __mmask16, to_lo);
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(hi).cast(), ((1u32 << (16 - c)) - 1) as __mmask16, to_hi);
        }
        lo += c;
        hi += 16 - c;
        i += 16;
    }
    inv + partition_tail(src, dst, bit, i, hi - half)
}

/// Inversions of a permutation of [base, base + len), base a multiple of 2^`bits`,
/// `bits` ≤ `BLOCKED_BITS`, in one pass: the values seen so far are a bitmap of 64-bit
/// words; a value v is passed over by the seen values above it in its own word (one
/// popcount) and by all values seen in higher words, kept per word in `above`, which
/// each value increments below its word (a short vector add).
fn blocked_inversions(src: &[u32], bits: u32) -> u64 {
    const WORDS: usize = 1 << (BLOCKED_BITS - 6);
    let mask = (1u32 << bits) - 1;
    let mut inv = 0u64;
    if bits <= 6 {
        let mut seen = 0u64;
        for &v in src {
            let r = v & mask;
            inv += u64::from(((seen >> r) >> 1).count_ones());
            seen |= 1 << r;
        }
        return inv;
    }
    let mut seen = [0u64; WORDS];
    // above[w]: values seen in words > w (< 2^BLOCKED_BITS)
    let mut above = [0u16; WORDS];
    for &v in src {
        let l = (v & mask) as usize;
        let (w, r) = (l >> 6, l & 63);
        inv += u64::from(above[w]) + u64::from(((seen[w] >> r) >> 1).count_ones());
        seen[w] |= 1 << r;
        for (j, a) in above.iter_mut().enumerate() {
            *a += u16::from(j < w);
        }
    }
    inv
}

// ------------------------------------------------------------------ normal tail

/// Φ(a), the standard normal CDF, for the one-sided asymptotic p-values (scipy's
/// `special.ndtr`), from `erfc` on the side where it does not cancel.
pub fn ndtr(a: f64) -> f64 {
    let x = a * std::f64::consts::FRAC_1_SQRT_2;
    if x < 0.0 {
        0.5 * erfc(-x)
    } else {
        1.0 - 0.5 * erfc(x)
    }
}

/// Complementary error function, for the p-value 2·Φ(−|z|) = erfc(|z|/√2).
/// A power series for erf below 2 (all terms positive: no cancellation), a
/// continued fraction (modified Lentz) above; relative error ~1e-14.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    const FRAC_1_SQRT_PI: f64 = 0.564_189_583_547_756_3;
    if x < 2.0 {
        // erf(x) = 2/√π · e^{−x²} · Σ_k x (2x²)^k / (1·3·…·(2k+1))
        let x2 = x * x;
        let mut term = x;
        let mut sum = x;
        let mut k = 0.0;
        while term > sum * 1e-17 {
            k += 1.0;
            term *= 2.0 * x2 / (2.0 * k + 1.0);
            sum += term;
        }
        return 1.0 - 2.0 * FRAC_1_SQRT_PI * (-x2).exp() * sum;
    }
    if x > 27.3 {
        return 0.0; // below the smallest subnormal
    }
    // erfc(x) = e^{−x²}/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …))))
    let tiny = 1e-300;
    let mut f = x;
    let mut c = x;
    let mut d = 0.0;
    for k in 1..500 {
        let a = k as f64 / 2.0;
        d = x + a * d;
        d = if d == 0.0 { tiny } else { 1.0 / d };
        c = x + a / c;
        if c == 0.0 {
            c = tiny;
        }
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    FRAC_1_SQRT_PI * (-x * x).exp() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The brute force below computes the asymptotic p-value (scipy's `method="asymptotic"`).
    const ASY: Options = Options { method: Method::Asymptotic, variant: Variant::B, alternative: Alternative::TwoSided };

    /// The O(n²) definition, counted pair by pair, with scipy's formulas.
    fn brute(x: &[f64], y: &[f64]) -> KendallTau {
        let n = x.len();
        if x.iter().chain(y).any(|v| v.is_nan()) {
            return KendallTau::NAN;
        }
        let (mut con, mut dis, mut xt, mut yt, mut joint) = (0i64, 0i64, 0i64, 0i64, 0i64);
        for i in 0..n {
            for j in i + 1..n {
                let dx = x[i].partial_cmp(&x[j]).unwrap();
                let dy = y[i].partial_cmp(&y[j]).unwrap();
                use std::cmp::Ordering::Equal;
                match (dx == Equal, dy == Equal) {
                    (true, true) => {
                        xt += 1;
                        yt += 1;
                        joint += 1
                    }
                    (true, false) => xt += 1,
                    (false, true) => yt += 1,
                    _ if dx == dy => con += 1,
                    _ => dis += 1,
                }
            }
        }
        let tot = (n * n.saturating_sub(1) / 2) as i64;
        assert_eq!(con + dis + xt + yt - joint, tot);
        if xt == tot || yt == tot {
            return KendallTau::NAN;
        }
        let tau = (con - dis) as f64 / ((tot - xt) as f64).sqrt() / ((tot - yt) as f64).sqrt();
        // Tie-group sums by brute force too.
        let groups = |v: &[f64]| -> (f64, f64) {
            let mut seen = vec![false; n];
            let (mut v0, mut v1) = (0.0, 0.0);
            for i in 0..n {
                if seen[i] {
                    continue;
                }
                let mut c = 0.0;
                for j in i..n {
                    if v[j] == v[i] {
                        seen[j] = true;
                        c += 1.0;
                    }
                }
                v0 += c * (c - 1.0) * (c - 2.0);
                v1 += c * (c - 1.0) * (2.0 * c + 5.0);
            }
            (v0, v1)
        };
        let ((x0, x1), (y0, y1)) = (groups(x), groups(y));
        let nf = n as f64;
        let m = nf * (nf - 1.0);
        let third = if x0 * y0 == 0.0 { 0.0 } else { x0 * y0 / (9.0 * m * (nf - 2.0)) };
        let var = (m * (2.0 * nf + 5.0) - x1 - y1) / 18.0 + 2.0 * xt as f64 * yt as f64 / m + third;
        let z = (con - dis) as f64 / var.sqrt();
        KendallTau { tau: tau.clamp(-1.0, 1.0), pvalue: erfc(z.abs() / 2f64.sqrt()) }
    }

    /// xorshift64*: deterministic inputs without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, k: u64) -> f64 {
            (self.next() % k) as f64
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        }
        /// `levels` = 0: continuous; otherwise integers below `levels`.
        fn draw(&mut self, levels: u64) -> f64 {
            if levels == 0 {
                self.unit()
            } else {
                self.below(levels)
            }
        }
    }

    fn close(a: KendallTau, b: KendallTau) -> bool {
        let same = |u: f64, v: f64, tol: f64| (u.is_nan() && v.is_nan()) || (u - v).abs() <= tol * (1.0 + v.abs());
        same(a.tau, b.tau, 1e-12) && same(a.pvalue, b.pvalue, 1e-9)
    }

    /// x with `lx` levels, y with `ly` levels, y = x half the time (some association).
    fn sample(rng: &mut Rng, n: usize, lx: u64, ly: u64) -> (Vec<f64>, Vec<f64>) {
        let x: Vec<f64> = (0..n).map(|_| rng.draw(lx)).collect();
        let y = x.iter().map(|&v| if rng.next() % 2 == 0 && (ly == 0 || v < ly as f64) { v } else { rng.draw(ly) }).collect();
        (x, y)
    }

    #[test]
    fn kendall_matches_brute_force_random_with_and_without_ties() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for n in [0usize, 1, 2, 3, 4, 5, 7, 10, 25, 33, 64, 100, 257, 1500] {
            // (0, 0): ranks; small levels both: contingency table;
            // 2000 levels (> SMALL_DISTINCT) with a small one: ranks with ties
            for (lx, ly) in [(0, 0), (2, 2), (3, 10), (50, 50), (0, 3), (2000, 4), (2000, 2000), (1, 5)] {
                let (x, y) = sample(&mut rng, n, lx, ly);
                let want = brute(&x, &y);
                let got = kendall_tau(&x, &y, ASY).unwrap();
                assert!(close(got, want), "n={n} levels=({lx},{ly}): {got:?} vs {want:?}");
                let (tau, p) = kendall_tau_matrix(&[x, y].concat(), 2, n, ASY).unwrap();
                let got = KendallTau { tau: tau[1], pvalue: p[1] };
                assert!(close(got, want), "matrix n={n} levels=({lx},{ly}): {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn kendall_matrix_every_path_matches_brute_force() {
        // rows: continuous, continuous, 4 levels, 600 levels, 600 levels (600² cells >
        // TABLE_MAX: gather + sort within groups), 1000 levels (small), 2 levels, with a NaN, constant
        let mut rng = Rng(5);
        let n = 1200;
        let levels = [0u64, 0, 4, 600, 600, 1000, 2];
        let mut data: Vec<f64> = levels.iter().flat_map(|&l| (0..n).map(|_| rng.draw(l)).collect::<Vec<_>>()).collect();
        for k in 0..n {
            data[n + k] = data[k] + 0.3 * data[n + k]; // rows 0 and 1 associated
        }
        let mut nan_row: Vec<f64> = (0..n).map(|_| rng.unit()).collect();
        nan_row[7] = f64::NAN;
        data.extend(nan_row);
        data.extend(vec![2.0; n]);
        let v = levels.len() + 2;
        let (tau, p) = kendall_tau_matrix(&data, v, n, ASY).unwrap();
        for i in 0..v {
            for j in 0..v {
                let (xi, xj) = (&data[i * n..(i + 1) * n], &data[j * n..(j + 1) * n]);
                let want = brute(xi, xj);
                let got = KendallTau { tau: tau[i * v + j], pvalue: p[i * v + j] };
                assert!(close(got, want), "({i},{j}): {got:?} vs {want:?}");
                assert!(close(kendall_tau(xi, xj, ASY).unwrap(), want), "scalar ({i},{j})");
            }
        }
        assert!(kendall_tau_matrix(&data, v, n + 1, ASY).is_err());
        let (t, _) = kendall_tau_matrix(&[], 0, 10, ASY).unwrap();
        assert!(t.is_empty());
        let (t, _) = kendall_tau_matrix(&[], 3, 0, ASY).unwrap();
        assert!(t.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn kendall_small_ranks_boundary() {
        let exactly: Vec<f64> = (0..SMALL_DISTINCT).rev().map(|i| i as f64 * 0.5).collect();
        let s = SmallRanks::new(&exactly).unwrap();
        assert_eq!(s.distinct(), SMALL_DISTINCT);
        assert!(s.ranks.iter().zip(&exactly).all(|(&r, &v)| r as f64 == v * 2.0));
        let one_more: Vec<f64> = (0..=SMALL_DISTINCT).map(|i| i as f64).collect();
        assert!(SmallRanks::new(&one_more).is_none());
    }

    #[test]
    fn kendall_ranked_sorted_matches_a_comparison_sort() {
        let mut rng = Rng(42);
        let special = [0.0, -0.0, f64::INFINITY, f64::NEG_INFINITY, 1e308, -1e308, 5e-324, -5e-324, 1.0, 1.0 + f64::EPSILON];
        for n in [0usize, 1, 2, 3, 17, 100, 1000, 70_000] {
            for kind in 0..7 {
                let v: Vec<f64> = (0..n)
                    .map(|_| match kind {
                        0 => rng.unit(),                                  // continuous
                        1 => rng.below(3000),                             // ties
                        2 => special[(rng.next() % special.len() as u64) as usize],
                        3 => 1.0 + rng.below(64) * f64::EPSILON,          // below the coarse resolution
                        4 => rng.unit() * 1e300 * if rng.next().is_multiple_of(2) { 1.0 } else { 1e-300 }, // huge spread
                        5 => f64::from_bits(rng.next() & !(0x7ff << 52) | (rng.next() % 2046 + 1) << 52), // any finite
                        _ => if rng.next().is_multiple_of(100) { f64::INFINITY } else { rng.unit() },
                    })
                    .collect();
                let mut want: Vec<(u64, u32)> = v.iter().enumerate().map(|(i, &x)| (order_key(x), i as u32)).collect();
                want.sort();
                let r = Ranked::sorted(&v);
                let order = r.order.get().unwrap();
                assert_eq!(order, &want.iter().map(|p| p.1).collect::<Vec<_>>(), "n={n} kind={kind}");
                let mut rank = 0u32;
                let mut starts = vec![];
                for (k, &(key, i)) in want.iter().enumerate() {
                    if k == 0 || key != want[k - 1].0 {
                        starts.push(k as u32);
                        rank = starts.len() as u32 - 1;
                    }
                    assert_eq!(r.ranks()[i as usize], rank, "n={n} kind={kind}");
                }
                starts.push(n as u32);
                assert_eq!(r.starts, starts, "n={n} kind={kind}");
                let keys: Vec<u64> = want.iter().map(|p| p.0).collect();
                assert_eq!(r.ties, Ties::of_sorted(&keys), "n={n} kind={kind}");
            }
        }
    }

    #[test]
    fn kendall_permutation_inversions_match_direct_counts() {
        let mut rng = Rng(99);
        for n in [0usize, 1, 2, 3, 5, 8, 31, 32, 33, 100, 1000, 3 * PAR_CUTOFF + 3] {
            let mut p: Vec<u32> = (0..n as u32).collect();
            for i in (1..n).rev() {
                p.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let want: u64 = if n <= 1000 {
                (0..n).map(|i| (i + 1..n).filter(|&j| p[i] > p[j]).count() as u64).sum()
            } else {
                // a Fenwick tree over the values seen so far
                let mut tree = vec![0u64; n + 1];
                let mut inv = 0u64;
                for (seen, &v) in p.iter().enumerate() {
                    let mut i = v as usize + 1;
                    let mut le = 0;
                    while i > 0 {
                        le += tree[i];
                        i &= i - 1;
                    }
                    inv += seen as u64 - le;
                    let mut i = v as usize + 1;
                    while i <= n {
                        tree[i] += 1;
                        i += i & i.wrapping_neg();
                    }
                }
                inv
            };
            assert_eq!(permutation_inversions(p.clone()), want, "n={n}");
            assert_eq!(permutation_inversions_with(p.clone(), Kernel::Scalar), want, "scalar n={n}");
            let sorted: Vec<u32> = (0..n as u32).collect();
            assert_eq!(permutation_inversions(sorted.clone()), 0);
            let rev: Vec<u32> = sorted.into_iter().rev().collect();
            assert_eq!(permutation_inversions(rev), (n * n.saturating_sub(1) / 2) as u64);
        }
    }

    #[test]
    fn kendall_edge_cases() {
        let nan = |r: KendallTau| r.tau.is_nan() && r.pvalue.is_nan();
        assert!(nan(kendall_tau(&[], &[], ASY).unwrap()));
        assert!(nan(kendall_tau(&[1.0], &[2.0], ASY).unwrap()));
        assert!(nan(kendall_tau(&[1.0, 2.0, 3.0], &[4.0, 4.0, 4.0], ASY).unwrap()));
        assert!(nan(kendall_tau(&[5.0; 10], &[5.0; 10], ASY).unwrap()));
        assert!(nan(kendall_tau(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0], ASY).unwrap()));
        assert!(kendall_tau(&[1.0, 2.0], &[1.0], ASY).is_err());
        // n = 2: var = 1, z = ±1
        let r = kendall_tau(&[1.0, 2.0], &[2.0, 1.0], ASY).unwrap();
        assert_eq!(r.tau, -1.0);
        assert!((r.pvalue - 0.31731050786291415).abs() < 1e-15);
        // −0.0 ties with 0.0; infinities order
        let r = kendall_tau(&[0.0, -0.0, 1.0], &[1.0, 2.0, 3.0], ASY).unwrap();
        assert!((r.tau - 0.816496580927726).abs() < 1e-15);
        let big: Vec<f64> = (0..3000).map(|i| i as f64).collect();
        let mut x = big.clone();
        x[0] = -0.0;
        x[1] = 0.0;
        x[2] = f64::NEG_INFINITY;
        x[2999] = f64::INFINITY;
        assert!(close(kendall_tau(&x, &big, ASY).unwrap(), brute(&x, &big)));
        let r = kendall_tau(&[f64::NEG_INFINITY, -1e300, 0.0, 1e-300, f64::INFINITY], &[1.0, 2.0, 3.0, 4.0, 5.0], ASY).unwrap();
        assert!((r.tau - 1.0).abs() < 1e-15); // 10/√10/√10 rounds below 1, in scipy too
    }

    #[test]
    fn kendall_exact_pvalue_is_scipys_to_the_bit() {
        // reference: scipy.stats._mstats_basic._kendall_p_exact(n, c, alternative), scipy 1.17.1
        use Alternative::*;
        for (n, c, two, less, greater) in [
            (3u64, 3u64, 0.3333333333333333, 1.0, 0.16666666666666666),
            (3, 2, 1.0, 0.8333333333333333, 0.5),
            (4, 3, 1.0, 0.625, 0.625),
            (5, 7, 0.48333333333333334, 0.8833333333333333, 0.24166666666666667),
            (10, 30, 0.21637345679012346, 0.9221290784832452, 0.10818672839506173),
            (10, 20, 0.7274895282186948, 0.3637447641093474, 0.6996731701940035),
            (20, 100, 0.7732194749063227, 0.6376818897363592, 0.38660973745316135),
            (33, 300, 0.2736433388865907, 0.8698668013177696, 0.13682166944329535),
            (33, 264, 1.0, 0.5061305884936991, 0.5061305884936987),
            (40, 1, 9.804939513027087e-47, 4.902469756513544e-47, 1.0),
            (40, 0, 2.451234878256772e-48, 1.225617439128386e-48, 1.0),
            (200, 10000, 0.9167913467388841, 0.5424416799857379, 0.45839567336944204),
            (300, 0, 0.0, 0.0, 1.0),
        ] {
            for (alt, want) in [(TwoSided, two), (Less, less), (Greater, greater)] {
                assert_eq!(exact_pvalue(n, c, alt).unwrap(), want, "n={n} c={c} {alt:?}");
            }
        }
        assert_eq!(exact_pvalue(2, 1, TwoSided).unwrap(), 1.0);
        // too many terms: an error, not an allocation of terabytes
        assert!(exact_pvalue(1_000_000, 250_000_000_000, TwoSided).is_err());
    }

    #[test]
    fn kendall_auto_takes_the_exact_distribution_without_ties() {
        let auto = Options::default();
        // n = 2: exact p = 1 (the asymptotic one is erfc(1/√2)); n = 3 monotone: 2/3! = 1/3
        assert_eq!(kendall_tau(&[1.0, 2.0], &[3.0, 4.0], auto).unwrap().pvalue, 1.0);
        assert_eq!(kendall_tau(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], auto).unwrap().pvalue, 1.0 / 3.0);
        // n = 100 without ties, all concordant but one pair: still exact (2/99!)
        let x: Vec<f64> = (0..100).map(f64::from).collect();
        let mut y = x.clone();
        y.swap(0, 1);
        assert_eq!(kendall_tau(&x, &y, auto).unwrap().pvalue, exact_pvalue(100, 4949, Alternative::TwoSided).unwrap());
        // with a tie: asymptotic; `Exact` refuses
        y[5] = y[6];
        assert_eq!(kendall_tau(&x, &y, auto).unwrap(), kendall_tau(&x, &y, ASY).unwrap());
        let exact = Options { method: Method::Exact, ..auto };
        assert!(kendall_tau(&x, &y, exact).is_err());
        assert!(kendall_tau_matrix(&[x.clone(), y].concat(), 2, 100, exact).is_err());
        // τ-c: 2(P − Q)/(n²(m − 1)/m)
        let c = Options { variant: Variant::C, ..auto };
        let r = kendall_tau(&[1.0, 1.0, 2.0, 3.0], &[1.0, 2.0, 2.0, 3.0], c).unwrap();
        assert!((r.tau - 2.0 * 4.0 / (16.0 * 2.0 / 3.0)).abs() < 1e-15, "{r:?}");
    }

    #[test]
    fn kendall_factorial_is_correctly_rounded() {
        // reference: float(math.factorial(n))
        for (n, want) in [(0u64, 1.0), (1, 1.0), (20, 2432902008176640000.0), (21, 5.109094217170944e+19),
            (22, 1.1240007277776077e+21), (23, 2.585201673888498e+22), (25, 1.5511210043330986e+25),
            (33, 8.683317618811886e+36), (170, 7.257415615307999e+306)] {
            assert_eq!(factorial(n), want, "{n}!");
        }
        assert_eq!(factorial(171), f64::INFINITY);
    }

    #[test]
    fn kendall_pairwise_sum_orders_as_numpy() {
        // a big value first, so the order of the additions shows in the rounding;
        // reference: float(np.sum(v)) (numpy 2.4), which differs from a left-to-right sum
        for (n, want) in [(0usize, 0.0), (1, 1e16), (7, 1.0000000000000012e16), (8, 1.000000000000001e16),
            (9, 1.0000000000000012e16), (100, 1.000000000000059e16), (128, 1.0000000000000938e16),
            (129, 1.0000000000000952e16), (300, 1.0000000000004782e16)] {
            let v: Vec<f64> = (0..n).map(|i| if i == 0 { 1e16 } else { 1.0 + i as f64 * 0.1 }).collect();
            assert_eq!(pairwise_sum(&v), want, "n={n}");
        }
    }

    #[test]
    fn kendall_order_key_is_monotone() {
        let v = [f64::NEG_INFINITY, -1e300, -1.0, -1e-310, -0.0, 0.0, 1e-310, 1.0, 1e300, f64::INFINITY];
        for w in v.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]));
            assert_eq!(order_key(w[0]) == order_key(w[1]), w[0] == w[1]);
        }
        assert!(v.iter().all(|&x| order_key(x) != u64::MAX));
    }

    #[test]
    fn kendall_erfc_known_values() {
        // reference values: scipy.special.erfc
        for (x, want) in [
            (0.0, 1.0),
            (1e-10, 0.999999999887162),
            (0.3, 0.6713732405408726),
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028516),
            (1.5, 0.03389485352468927),
            (1.99, 0.004888586800383002),
            (2.0, 0.004677734981047266),
            (2.01, 0.004475150644751764),
            (2.5, 0.00040695201744495886),
            (3.0, 2.2090496998585445e-05),
            (5.0, 1.5374597944280347e-12),
            (10.0, 2.0884875837625446e-45),
            (26.5, 2.2109076642637343e-307),
        ] {
            let got = erfc(x);
            assert!((got - want).abs() <= 1e-13 * want, "erfc({x}) = {got}, want {want}");
        }
        assert_eq!(erfc(40.0), 0.0);
        assert!((erfc(-1.0) - (2.0 - 0.15729920705028516)).abs() < 1e-15);
    }
}

