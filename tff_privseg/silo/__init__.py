"""Cross-silo deployment: each hospital's data, key, noise and budget stay at the hospital.

`site`: the long-lived site process (`tff-privseg site serve`): preprocesses and caches its own
scans, keeps its own secret key (`state`), runs the local update with its own DP-SGD noise,
checks every round against its own policy (`policy`) and privacy ledger, and answers with the
noised update and aggregate validation counts only. `coordinator`: `train --sites`, the
federated round loop of `federated.train.run_rounds` with remote client updates and no data.
`wire`: what travels between them, over mutual TLS gRPC.
"""
