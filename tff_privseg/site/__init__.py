"""The site side of a cross-silo deployment: one long-lived process next to a hospital's data.

`tff-privseg site serve` (`service.serve`) preprocesses and caches the site's own scans, keeps
its own secret key (`state.SiteState`), runs the local update with its own DP-SGD noise, checks
every round against its own policy (`policy.SitePolicy`) and privacy ledger, and answers a
coordinator (`tff_privseg.federated.cross_silo`) over mutual TLS gRPC (`wire`) with the noised
update and aggregate validation counts only.
"""
