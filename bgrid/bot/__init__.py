"""The ``bgrid bot`` worker: takes leases from a bgrid server through the Remote Workers API
Bots service and runs their REAPI actions."""
