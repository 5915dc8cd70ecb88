module mqplug/sdk

go 1.26
