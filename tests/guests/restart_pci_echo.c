/* restart_echo.c against pci-echo's BARs (tests/vmm/test_restart.py). */
#define PCI_ECHO 1
#include "restart_echo.c"
