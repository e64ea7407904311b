"""The scaling-law fitters (numpy and scipy only); `moe.scaling` lists what each module
holds. Import from the modules themselves (this package re-exports nothing)."""
