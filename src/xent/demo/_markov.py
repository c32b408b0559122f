"""A synthetic source whose entropy is known exactly: a sparse random Markov chain over made-up words.

Documents are words joined by single spaces, the first word drawn from the stationary distribution π,
each next word from the row of the transition matrix P. Two exact quantities follow:

- the entropy rate H = Σ_i π_i · H(P_i) nats per word (the process is stationary from its first word);
- for any given document, its exact negative log-likelihood −log π(w₁) − Σ log P(w_t | w_{t−1}).

A language model's loss on the same text can only be larger on average: the difference, per word or
per byte, estimates the KL divergence from the true source to the model. Words, bytes and the text are
in one-to-one correspondence (single spaces between words that contain none), so the comparison does
not depend on how the model's tokenizer cuts the text.
"""

from __future__ import annotations

import math

import torch

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class MarkovSource:
    """A seeded sparse Markov chain over ``num_words`` pseudo-words.

    Each word has between ``min_out`` and ``max_out`` successors with uniform-Dirichlet weights, plus
    the edge to the next word in a fixed cycle so the chain is irreducible. All arithmetic is float64.
    """

    def __init__(self, *, num_words: int = 64, min_out: int = 2, max_out: int = 6, seed: int = 0):
        if num_words < 2:
            raise ValueError(f"num_words must be at least 2, got {num_words}")
        g = torch.Generator().manual_seed(seed)
        syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
        words: list[str] = []
        seen = set()
        while len(words) < num_words:
            idx = torch.randint(len(syllables), (2,), generator=g).tolist()
            word = syllables[idx[0]] + syllables[idx[1]]
            if word not in seen:
                seen.add(word)
                words.append(word)
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        K = num_words
        P = torch.zeros(K, K, dtype=torch.float64)
        for i in range(K):
            n_out = int(torch.randint(min_out, max_out + 1, (1,), generator=g))
            succ = torch.randperm(K, generator=g)[:n_out].tolist()
            succ = sorted(set(succ) | {(i + 1) % K})
            # Dirichlet(1, ..., 1) = normalised Exponential(1) draws (seeded: torch's own samplers of
            # the Dirichlet and Gamma take no generator).
            w = -torch.log1p(-torch.rand(len(succ), generator=g, dtype=torch.float64))
            P[i, succ] = w / w.sum()
        self.P = P  # [K, K], rows sum to 1
        self.pi = _stationary(P)  # [K]

    @property
    def entropy_rate(self) -> float:
        """H = Σ_i π_i H(P_i) = −Σ_ij π_i P_ij log P_ij, nats per word (after the first).

        Summed with math.fsum (exactly rounded), so the value does not depend on how a vectorised
        reduction happens to be split, e.g. in another process."""
        P, pi = self.P.tolist(), self.pi.tolist()
        return -math.fsum(pi[i] * p * math.log(p) for i, row in enumerate(P) for p in row if p > 0)

    @property
    def first_word_entropy(self) -> float:
        return -math.fsum(p * math.log(p) for p in self.pi.tolist() if p > 0)

    def sample(self, num_docs: int, words_per_doc: int, *, seed: int) -> list[str]:
        """``num_docs`` documents of ``words_per_doc`` words each."""
        g = torch.Generator().manual_seed(seed)
        # Inverse-CDF sampling, all documents at once: word = #{cumulative probabilities < u}.
        u = torch.rand(num_docs, words_per_doc, generator=g, dtype=torch.float64)
        cdf = self.P.cumsum(dim=1)  # [K, K]
        K = len(self.words)
        w = torch.searchsorted(self.pi.cumsum(0), u[:, 0].contiguous()).clamp_max(K - 1)  # [num_docs]
        seqs = [w]
        for t in range(1, words_per_doc):
            w = torch.searchsorted(cdf[w], u[:, t : t + 1].contiguous()).squeeze(1).clamp_max(K - 1)
            seqs.append(w)
        ids = torch.stack(seqs, dim=1).tolist()
        return [" ".join(self.words[i] for i in row) for row in ids]

    def nll(self, text: str) -> float:
        """The exact −log p(text) in nats under this source."""
        ids = [self.index[w] for w in text.split(" ")]
        total = -math.log(float(self.pi[ids[0]]))
        for a, b in zip(ids[:-1], ids[1:]):
            p = float(self.P[a, b])
            if p == 0.0:
                return math.inf
            total -= math.log(p)
        return total


def _stationary(P: torch.Tensor) -> torch.Tensor:
    """π with πP = π: the null vector of (Pᵀ − I), found by a least-squares solve with Σπ = 1 appended."""
    K = P.shape[0]
    A = torch.cat([P.T - torch.eye(K, dtype=P.dtype), torch.ones(1, K, dtype=P.dtype)])
    b = torch.zeros(K + 1, dtype=P.dtype)
    b[-1] = 1.0
    pi = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    return pi.clamp_min(0) / pi.clamp_min(0).sum()
