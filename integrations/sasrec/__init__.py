"""SASRec on the largevocab losses: model, data, losses by name, full-catalogue metrics, training and a CLI.

    from largevocab.integrations.sasrec import (SASRec, SASRecConfig, TrainConfig, build_loss, leave_one_out,
                                                read_sasrec_txt, train)
    split = leave_one_out(read_sasrec_txt("ml-1m.txt"))
    model = SASRec(SASRecConfig(num_items=split.num_items))              # d=64, 2 blocks, 1 head, L=200
    result = train(model, split, build_loss("sce"), TrainConfig(max_epochs=50, out_dir="runs/sce"))

Command line: ``python -m largevocab.integrations.sasrec.cli --data FILE --loss sce --out DIR``.
"""

from .data import (
    SequenceData,
    Split,
    TrainBatches,
    download_movielens_1m,
    filter_min_interactions,
    leave_one_out,
    load_interactions_dataset,
    read_interactions,
    read_movielens_ratings,
    read_sasrec_txt,
    table_to_sequences,
    temporal_split,
)
from .losses import LOSS_NAMES, SASRecLoss, build_loss, gbce_beta
from .metrics import RankingMetrics, rank_metrics, streaming_topk
from .model import SASRec, SASRecConfig
from .train import TrainConfig, evaluate, load_checkpoint, save_checkpoint, train

__all__ = [
    "LOSS_NAMES",
    "RankingMetrics",
    "SASRec",
    "SASRecConfig",
    "SASRecLoss",
    "SequenceData",
    "Split",
    "TrainBatches",
    "TrainConfig",
    "build_loss",
    "download_movielens_1m",
    "evaluate",
    "filter_min_interactions",
    "gbce_beta",
    "leave_one_out",
    "load_interactions_dataset",
    "load_checkpoint",
    "rank_metrics",
    "read_interactions",
    "read_movielens_ratings",
    "read_sasrec_txt",
    "save_checkpoint",
    "streaming_topk",
    "table_to_sequences",
    "temporal_split",
    "train",
]
