//! Which rank owns which expert.

use moe_core::MoeError;

/// The owner of every expert of a layer: contiguous blocks (`E / R` experts per rank, the first `E mod R` ranks one
/// more) or an explicit map. Each rank runs its experts in ascending global id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    owner: Vec<u32>,
    ranks: usize,
}

impl Placement {
    /// Contiguous blocks: rank `r` owns experts `[r·E/R + min(r, E mod R), …)`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for zero experts or ranks.
    pub fn contiguous(n_experts: usize, ranks: usize) -> Result<Self, MoeError> {
        if n_experts == 0 || ranks == 0 {
            return Err(MoeError::config(
                "placement",
                format!("{n_experts} experts on {ranks} ranks"),
                "needs at least one expert and one rank",
            ));
        }
        let (base, extra) = (n_experts / ranks, n_experts % ranks);
        let mut owner = Vec::with_capacity(n_experts);
        for r in 0..ranks {
            let n = base + usize::from(r < extra);
            owner.extend(std::iter::repeat_n(r as u32, n));
        }
        Ok(Placement { owner, ranks })
    }

    /// An explicit map: `owner[e]` is the rank of expert `e`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for an empty map, zero ranks or an owner `>= ranks`.
    pub fn from_owners(owner: Vec<u32>, ranks: usize) -> Result<Self, MoeError> {
        if owner.is_empty() || ranks == 0 {
            return Err(MoeError::config(
                "placement",
                owner.len(),
                "needs at least one expert and one rank",
            ));
        }
        if let Some((e, &r)) = owner
            .iter()
            .enumerate()
            .find(|&(_, &r)| r as usize >= ranks)
        {
            return Err(MoeError::config(
                "placement",
                format!("expert {e} on rank {r}"),
                format!("ranks are 0..{ranks}"),
            ));
        }
        Ok(Placement { owner, ranks })
    }

    /// The number of experts `E`.
    pub fn n_experts(&self) -> usize {
        self.owner.len()
    }

    /// The number of ranks `R`.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The rank that owns expert `e` (`e < E`).
    pub fn owner(&self, e: usize) -> usize {
        self.owner[e] as usize
    }

    /// The owner of every expert.
    pub fn owners(&self) -> &[u32] {
        &self.owner
    }

    /// The experts rank `r` owns, ascending.
    pub fn experts_of(&self, r: usize) -> Vec<u32> {
        (0..self.owner.len() as u32)
            .filter(|&e| self.owner[e as usize] as usize == r)
            .collect()
    }

    /// `local[e]`: expert `e`'s index among its owner's experts.
    pub fn local_ids(&self) -> Vec<u32> {
        let mut next = vec![0u32; self.ranks];
        self.owner
            .iter()
            .map(|&r| {
                let id = next[r as usize];
                next[r as usize] += 1;
                id
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_blocks_spread_the_remainder_over_the_first_ranks() {
        let p = Placement::contiguous(10, 4).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.owners(), &[0, 0, 0, 1, 1, 1, 2, 2, 3, 3]);
        assert_eq!(p.experts_of(2), vec![6, 7]);
        assert_eq!(p.local_ids(), vec![0, 1, 2, 0, 1, 2, 0, 1, 0, 1]);
        let p = Placement::contiguous(2, 4).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.experts_of(3), Vec::<u32>::new());
        assert!(Placement::from_owners(vec![0, 2], 2).is_err());
        assert!(Placement::contiguous(0, 2).is_err());
    }
}
