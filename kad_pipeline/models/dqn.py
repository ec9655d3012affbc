"""The Disease Query Network (DQN): a pre-norm transformer decoder from disease queries to image tokens.

Each query is the frozen knowledge encoder's embedding of a disease name. The queries attend to
each other, then to the image tokens (the memory), and a Linear(d, 2) head scores every query:
softmax index 1 is the probability that the finding is present. There are no positional
encodings. One LayerNorm is shared by the memory, the queries and the decoder output.
"""

from __future__ import annotations

from torch import Tensor, nn


class PreNormDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to memory, feed-forward; LayerNorm before each."""

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(embed_dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.norm3 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, queries: Tensor, memory: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        # need_weights=False lets nn.MultiheadAttention use the fused scaled-dot-product kernel;
        # attention weights are only materialised when a caller asks for the maps.
        normed = self.norm1(queries)
        attended, _ = self.self_attn(normed, normed, normed, need_weights=False)
        queries = queries + self.dropout1(attended)

        normed = self.norm2(queries)
        attended, weights = self.multihead_attn(
            normed, memory, memory, need_weights=need_weights, average_attn_weights=True
        )  # weights: (B, Q, N) averaged over heads
        queries = queries + self.dropout2(attended)

        normed = self.norm3(queries)
        queries = queries + self.dropout3(self.linear2(self.dropout(self.linear1(normed).relu())))
        return queries, weights


class DiseaseQueryNetwork(nn.Module):
    """A stack of pre-norm decoder layers plus the shared LayerNorm and the Linear(d, 2) head."""

    def __init__(self, embed_dim: int = 768, num_layers: int = 4, num_heads: int = 4, ff_dim: int = 1024, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(embed_dim, num_heads, ff_dim, dropout) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.dropout_feas = nn.Dropout(dropout)
        self.mlp_head = nn.Sequential(nn.Linear(embed_dim, 2))

    def forward(
        self, memory: Tensor, queries: Tensor, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Score queries against memory tokens.

        memory: (B, N, d) image tokens, or (B, 1, d) for a single text token.
        queries: (Q, d) shared by the batch, or (B, Q, d).
        Returns logits (B, Q, 2) and, when ``need_weights``, one cross-attention map (B, Q, N) per layer.
        """
        if queries.dim() == 2:
            queries = queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        memory = self.decoder_norm(memory)
        hidden = self.decoder_norm(queries)

        attention_maps: list[Tensor] = []
        for layer in self.layers:
            hidden, weights = layer(hidden, memory, need_weights=need_weights)
            if weights is not None:
                attention_maps.append(weights)

        hidden = self.decoder_norm(hidden)
        logits = self.mlp_head(self.dropout_feas(hidden))  # (B, Q, 2)
        return logits, attention_maps
