"""The kernel: errors, files, the target records, the stage cache, resources, devices and interrupts. Torch-free;
every other layer may import it, and it imports none of them (the target records name converters and runtimes
only as "module:object" strings, resolved when a caller asks)."""
