"""The transport every role uses: connections to peers (CURVE, monitors, heartbeats, push), who
may connect (ZAP), and the emulated links of benchmarks. It imports no role."""
