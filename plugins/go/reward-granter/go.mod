module reward-granter

go 1.26

require mqplug/sdk v0.0.0

replace mqplug/sdk => ../sdk
