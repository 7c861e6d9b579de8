"""Datasets made from public formats by a published protocol, seeded and saved with their record.

    cifar10s   CIFAR-10 Skewed, grey/colour groups          options: skew, seed, unskewed
    utkface    UTKFace age bins x race, balanced test       options: seed, test_per_cell, age_bins, size
    celeba     CelebA attribute x attribute, balanced test  options: target, group, size, crop, seed
    utkface_edges  UTKFace edges -> face pairs (pix2pix)    options: size, edges, *_threshold, test_size, seed
    utkface_faces  the faces of utkface_edges, same split   options: size, test_size, seed, label (age | gender)
    synthetic_edges  generated shapes' edges -> shape pairs  options: n_train, n_test, size, seed, edges, ...
                     (no source: prepared from its options on first use)

Each registers a builder in DATASETS, so `prepare("cifar10s", source, skew=0.9)` and `kdforge prepare` use
it, and its options join the cache fingerprint. Every split saves `protocol.json` beside its cache
(`load_protocol(name, split)`), which a run can cite.
"""
# imported to register the builders
from kdforge.data.protocols import celeba, cifar10s, synthetic_edges, utkface, utkface_edges  # noqa: F401
from kdforge.data.protocols.record import PROTOCOL_FILE, ProtocolData, load_protocol

__all__ = ["PROTOCOL_FILE", "ProtocolData", "load_protocol"]
